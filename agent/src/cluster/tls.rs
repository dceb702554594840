//! TLS for the cluster's gRPC connections (rustls with ring, through tonic): `caisson certs`
//! bootstraps a local CA and server/agent/user certificates; the master requires a client
//! certificate from agents (mutual TLS); plaintext is only for loopback or with `--insecure`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Where to write ca.pem, server.pem, agent.pem, user.pem and their keys.
    #[arg(long)]
    dir: PathBuf,
    /// Extra names or IP addresses for the server certificate (repeatable).
    #[arg(long = "san")]
    sans: Vec<String>,
}

#[derive(Args, Debug, Default)]
pub struct ServerTlsArgs {
    /// Serve TLS with <dir>/server.pem, server-key.pem and require agent certificates
    /// signed by <dir>/ca.pem.
    #[arg(long = "tls-dir", env = "CAISSON_TLS_DIR")]
    pub dir: Option<PathBuf>,
    /// Allow plaintext on a non-loopback address.
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Args, Debug, Default, Clone)]
pub struct ClientTlsArgs {
    /// Directory with ca.pem and our certificate (agent.pem / user.pem), for https:// URLs.
    #[arg(long = "tls-dir", env = "CAISSON_TLS_DIR")]
    pub dir: Option<PathBuf>,
    /// Allow plaintext (http://) to a non-loopback master.
    #[arg(long)]
    pub insecure: bool,
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let p = dir.join(name);
    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
}

impl ServerTlsArgs {
    pub fn server_config(&self) -> Result<Option<ServerTlsConfig>> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        Ok(Some(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(
                    read(dir, "server.pem")?,
                    read(dir, "server-key.pem")?,
                ))
                .client_ca_root(Certificate::from_pem(read(dir, "ca.pem")?))
                // Users may come with only their API token; the agent service checks for a
                // verified client certificate itself.
                .client_auth_optional(true),
        ))
    }
}

fn host_of(url: &str) -> Result<(bool, String)> {
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .with_context(|| format!("invalid URL {url:?}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => bail!("invalid master URL {url:?}: expected http:// or https://"),
    };
    let host = uri
        .host()
        .unwrap_or("")
        .trim_matches(['[', ']'])
        .to_string();
    Ok((tls, host))
}

fn loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl ClientTlsArgs {
    /// The TLS config for `url` (https), as an agent (agent.pem) or a user (user.pem, if
    /// present). Refuses plaintext to a non-loopback host without `--insecure`.
    pub fn client_config(&self, url: &str, agent: bool) -> Result<Option<ClientTlsConfig>> {
        let (tls, host) = host_of(url)?;
        if !tls {
            if !loopback(&host) && !self.insecure {
                bail!("refusing plaintext to {host}: use https:// with --tls-dir, or --insecure");
            }
            return Ok(None);
        }
        let Some(dir) = &self.dir else {
            bail!("https:// needs --tls-dir (with ca.pem)");
        };
        let mut c = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(dir, "ca.pem")?))
            .domain_name(host);
        let who = if agent { "agent" } else { "user" };
        if dir.join(format!("{who}.pem")).exists() {
            c = c.identity(Identity::from_pem(
                read(dir, &format!("{who}.pem"))?,
                read(dir, &format!("{who}-key.pem"))?,
            ));
        } else if agent {
            bail!(
                "{}/agent.pem is missing: agents need a client certificate",
                dir.display()
            );
        }
        Ok(Some(c))
    }
}

fn write_private(path: &Path, data: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut f, data.as_bytes())?;
    Ok(())
}

/// `caisson certs --dir D`: a CA and server, agent and user certificates signed by it.
pub fn certs(a: CertsArgs) -> Result<std::process::ExitCode> {
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "caisson local CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write_private(&a.dir.join("ca-key.pem"), &ca_key.serialize_pem())?;
    std::fs::write(a.dir.join("ca.pem"), ca_cert.pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut server_names = vec!["localhost".to_string()];
    if let Ok(h) = nix::unistd::gethostname() {
        server_names.push(h.to_string_lossy().into_owned());
    }
    server_names.extend(a.sans.iter().cloned());
    let leaf = |name: &str, sans: &[String], usage: ExtendedKeyUsagePurpose| -> Result<()> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, name);
        for s in sans {
            p.subject_alt_names
                .push(match s.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(s.clone().try_into()?),
                });
        }
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        write_private(&a.dir.join(format!("{name}-key.pem")), &key.serialize_pem())?;
        std::fs::write(a.dir.join(format!("{name}.pem")), cert.pem())?;
        Ok(())
    };
    let mut sans = server_names;
    sans.extend(["127.0.0.1".to_string(), "::1".to_string()]);
    leaf("server", &sans, ExtendedKeyUsagePurpose::ServerAuth)?;
    leaf(
        "agent",
        &["caisson-agent".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    leaf(
        "user",
        &["caisson-user".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    println!(
        "wrote ca.pem, server.pem, agent.pem, user.pem (and keys) to {}",
        a.dir.display()
    );
    Ok(std::process::ExitCode::SUCCESS)
}
