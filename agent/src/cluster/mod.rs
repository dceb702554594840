//! Cluster mode (issue 7): the reference master, the agent daemon, the users' CLI and
//! `caisson demo`. The wire contract is the `caisson-proto` crate.
pub mod agent;
pub mod cli;
pub mod demo;
pub mod launcher;
pub mod master;
pub mod store;
pub mod tls;
pub mod wal;
pub mod wasmhost;

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

pub fn now_ms() -> u64 {
    containerizer::launch::state::now_ms()
}

/// `<prefix>` + 23 hex digits: short enough to read, random enough not to collide; the
/// prefix tells task ids (`t`) from agent ids (`a`) and from `caisson run`'s hex ids.
pub fn random_id(prefix: char) -> String {
    let bytes: [u8; 12] = rand::random();
    let mut s = String::with_capacity(24);
    s.push(prefix);
    s.push_str(&hex::encode(bytes)[..23]);
    s
}

/// Whether `id` looks like a task id the master hands out (agents adopt only those).
pub fn is_task_id(id: &str) -> bool {
    id.len() == 24 && id.starts_with('t') && id[1..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Server side: admits requests carrying `authorization: Bearer <token>`.
pub fn auth_interceptor(
    token: String,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    let expected = bearer(&token);
    move |req: Request<()>| {
        let got = req
            .metadata()
            .get(caisson_proto::AUTH_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // Equal length first, then every byte: no early exit on the first difference.
        let ok = !token.is_empty()
            && got.len() == expected.len()
            && got
                .bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if ok {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong token"))
        }
    }
}

/// Client side: adds the token to every request.
#[derive(Clone)]
pub struct Token(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert(caisson_proto::AUTH_HEADER, self.0.clone());
        Ok(req)
    }
}

pub fn token_interceptor(token: &str) -> anyhow::Result<Token> {
    Ok(Token(bearer(token).parse()?))
}
