//! Netlink (rtnetlink) helpers, run on a single-threaded tokio runtime.
//!
//! A netlink socket belongs to the network namespace it was created in. To work inside a task's
//! namespace we switch this (only) thread into it just long enough to open the socket, then
//! switch back; the plugin process is single-threaded, so no other work sees the switch.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsFd;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkInfo, LinkMessage,
};
use nix::sched::CloneFlags;
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use crate::skel::{code, CniError};

/// A netlink failure, saying what was being done.
pub fn err(what: impl std::fmt::Display, e: rtnetlink::Error) -> CniError {
    CniError::new(code::NETLINK, what.to_string()).with_details(e)
}

/// The errno of a netlink NACK (positive), if that is what `e` is.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// A current-thread runtime: no worker threads, so `setns` on this thread is safe.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("tokio runtime")
}

/// A handle in the current namespace. Call inside the runtime.
pub fn connect() -> Result<Handle, CniError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| CniError::io("opening netlink", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A handle in the namespace `ns`. Call inside the runtime.
pub fn connect_in(ns: &File) -> Result<Handle, CniError> {
    let own =
        File::open("/proc/thread-self/ns/net").map_err(|e| CniError::io("opening own netns", e))?;
    nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|e| CniError::io("entering the container netns", e))?;
    let res = rtnetlink::new_connection();
    // Back home before anything else can run on this thread.
    nix::sched::setns(own.as_fd(), CloneFlags::CLONE_NEWNET).expect("returning to the host netns");
    let (conn, handle, _) =
        res.map_err(|e| CniError::io("opening netlink in the container netns", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Opens a netns path given in `CNI_NETNS`.
pub fn open_netns(path: &str) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        CniError::new(code::INVALID_ENV, format!("failed to open netns {path:?}")).with_details(e)
    })
}

/// The link called `name`, if any.
pub async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, CniError> {
    let mut s = h.link().get().match_name(name.to_owned()).execute();
    match s.try_next().await {
        Ok(l) => Ok(l),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(err(format!("looking up link {name}"), e)),
    }
}

pub fn mac(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(b) => Some(
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

pub fn kind(l: &LinkMessage) -> Option<InfoKind> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    })
}

pub fn controller(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

/// Returns the bridge `name`, creating it (up) if needed; concurrent creators are fine.
pub async fn ensure_bridge(
    h: &Handle,
    name: &str,
    mtu: Option<u32>,
) -> Result<LinkMessage, CniError> {
    if let Some(l) = link(h, name).await? {
        if kind(&l) != Some(InfoKind::Bridge) {
            return Err(CniError::config(format!(
                "{name:?} already exists but is not a bridge"
            )));
        }
        if l.header
            .flags
            .contains(netlink_packet_route::link::LinkFlags::Up)
        {
            return Ok(l);
        }
        let up = LinkUnspec::new_with_index(l.header.index).up().build();
        h.link()
            .set(up)
            .execute()
            .await
            .map_err(|e| err(format!("setting {name} up"), e))?;
        return Ok(l);
    }
    let mut b = LinkBridge::new(name).up();
    if let Some(m) = mtu {
        b = b.mtu(m);
    }
    match h.link().add(b.build()).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(libc::EEXIST) => {}
        Err(e) => return Err(err(format!("creating bridge {name}"), e)),
    }
    link(h, name).await?.ok_or_else(|| {
        CniError::new(
            code::NETLINK,
            format!("bridge {name} vanished after creation"),
        )
    })
}

/// Creates a veth pair in one request: `host` (up, enslaved to `bridge`) here, and `peer`
/// directly inside the namespace `ns` — no second step moving a link across namespaces. The
/// peer stays down: the kernel configures it before the host end exists, and a veth cannot be
/// opened without its peer (ENOTCONN); the caller sets it up afterwards.
pub async fn create_veth(
    h: &Handle,
    host: &str,
    peer: &str,
    ns: &File,
    bridge: u32,
    mtu: Option<u32>,
) -> Result<(), rtnetlink::Error> {
    use std::os::fd::AsRawFd;
    let mut pb = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer.to_owned())
        .setns_by_fd(ns.as_raw_fd());
    if let Some(m) = mtu {
        pb = pb.mtu(m);
    }
    let mut b = LinkVeth::new(host, peer).controller(bridge).up();
    if let Some(m) = mtu {
        b = b.mtu(m);
    }
    let b = b.set_info_data(InfoData::Veth(InfoVeth::Peer(pb.build())));
    h.link().add(b.build()).execute().await
}

/// Turns hairpin mode on for a bridge port (traffic may leave the port it came in on).
pub async fn set_hairpin(h: &Handle, index: u32) -> Result<(), CniError> {
    let m = LinkUnspec::new_with_index(index)
        .set_port_kind(InfoPortKind::Bridge)
        .set_port_data(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
            true,
        )]))
        .build();
    h.link()
        .set(m)
        .execute()
        .await
        .map_err(|e| err("setting hairpin mode", e))
}

/// Adds an address; an address already there is fine when `exist_ok`.
pub async fn add_addr(h: &Handle, index: u32, net: IpNet, exist_ok: bool) -> Result<(), CniError> {
    match h
        .address()
        .add(index, net.addr(), net.prefix_len())
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if exist_ok && errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(err(format!("adding address {net}"), e)),
    }
}

/// Adds a route via `gw` (or a link route) on link `index`.
pub async fn add_route(
    h: &Handle,
    index: u32,
    dst: IpNet,
    gw: Option<IpAddr>,
) -> Result<(), CniError> {
    let what = || format!("adding route {dst} via {gw:?}");
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .map_err(|e| CniError::config(what()).with_details(e))?
        .output_interface(index)
        // As the reference plugins (and `ip route` by default) mark them.
        .protocol(netlink_packet_route::route::RouteProtocol::Boot);
    if let Some(g) = gw {
        b = b
            .gateway(g)
            .map_err(|e| CniError::config(what()).with_details(e))?;
    }
    match h.route().add(b.build()).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(err(what(), e)),
    }
}

/// Deletes link `name` if it exists.
pub async fn del_link(h: &Handle, name: &str) -> Result<bool, CniError> {
    let Some(l) = link(h, name).await? else {
        return Ok(false);
    };
    match h.link().del(l.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(err(format!("deleting link {name}"), e)),
    }
}

/// Sets link `name` up.
pub async fn set_up(h: &Handle, name: &str) -> Result<LinkMessage, CniError> {
    let l = link(h, name)
        .await?
        .ok_or_else(|| CniError::new(code::NETLINK, format!("no link {name}")))?;
    set_index_up(h, l.header.index, name).await?;
    Ok(l)
}

/// Sets the link with index `index` (called `name`, for errors) up.
pub async fn set_index_up(h: &Handle, index: u32, name: &str) -> Result<(), CniError> {
    let m = LinkUnspec::new_with_index(index).up().build();
    h.link()
        .set(m)
        .execute()
        .await
        .map_err(|e| err(format!("setting {name} up"), e))
}

/// Takes link `index` down.
pub async fn set_index_down(h: &Handle, index: u32, name: &str) -> Result<(), CniError> {
    let m = LinkUnspec::new_with_index(index).down().build();
    h.link()
        .set(m)
        .execute()
        .await
        .map_err(|e| err(format!("setting {name} down"), e))
}

/// The addresses on link `index`.
pub async fn addrs(h: &Handle, index: u32) -> Result<Vec<IpNet>, CniError> {
    use netlink_packet_route::address::AddressAttribute;
    let mut s = h.address().get().set_link_index_filter(index).execute();
    let mut out = Vec::new();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(|e| err("listing addresses", e))?
    {
        let plen = m.header.prefix_len;
        for a in &m.attributes {
            if let AddressAttribute::Address(ip) = a {
                out.extend(IpNet::new(*ip, plen).ok());
            }
        }
    }
    Ok(out)
}
