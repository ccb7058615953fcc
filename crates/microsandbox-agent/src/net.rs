//! Guest network interfaces: `lo` for every sandbox, `eth0` when the host gave it a NIC.
//!
//! Configured with the classic `SIOC*` ioctls on an `AF_INET` datagram socket (no netlink
//! library, no `ip` binary: the image may have neither). Linux gives `lo` its 127.0.0.1/8
//! (and `::1`) by itself when the interface goes up.

use std::ffi::CStr;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The NIC configuration the host passes on the kernel command line as
/// `msb.net=<guest ip>/<prefix>,<gateway>,<mtu>` (see `procfs::net`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

/// The IPv6 side of the NIC, `msb.net6=<guest ip>/<prefix>,<gateway>` (see
/// `procfs::net6`). The address is static: the host sends no router advertisements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net6Config {
    pub addr: Ipv6Addr,
    pub prefix: u8,
    pub gateway: Ipv6Addr,
}

/// The name `/etc/hosts` maps to the gateway, which the host side relays to host loopback.
pub const HOST_ALIAS: &str = "host.microsandbox.internal";

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &CStr) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.to_bytes()) {
        *dst = *src as libc::c_char;
    }
    req
}

fn ioctl(sock: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq, what: &str) -> io::Result<()> {
    // SAFETY: every request used here reads or writes one `ifreq`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn set_up(sock: &OwnedFd, name: &CStr) -> io::Result<()> {
    let mut req = ifreq(name);
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS")
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it by family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Brings up the loopback interface. Without it a server and a client on 127.0.0.1 in
/// one sandbox cannot talk (the kernel leaves `lo` down; there is no init system to do it).
pub fn loopback_up() -> Result<(), String> {
    let sock = socket().map_err(|e| format!("cannot open a socket to configure lo: {e}"))?;
    set_up(&sock, c"lo").map_err(|e| format!("cannot bring up lo: {e}"))
}

/// Netmask for a prefix length (0..=32).
pub fn netmask(prefix: u8) -> Ipv4Addr {
    match prefix {
        0 => Ipv4Addr::UNSPECIFIED,
        p => Ipv4Addr::from(u32::MAX << (32 - u32::from(p.min(32)))),
    }
}

/// Gives `eth0` its address, netmask and MTU, brings it up and adds the default route.
pub fn configure_eth0(cfg: &NetConfig) -> Result<(), String> {
    let fail = |what: &str, e: io::Error| format!("cannot configure eth0 ({what}): {e}");
    let sock = socket().map_err(|e| fail("socket", e))?;
    let name = c"eth0";
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_addr = sockaddr(cfg.addr);
    ioctl(&sock, libc::SIOCSIFADDR, &mut req, "SIOCSIFADDR").map_err(|e| fail("address", e))?;
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_netmask = sockaddr(netmask(cfg.prefix));
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req, "SIOCSIFNETMASK").map_err(|e| fail("netmask", e))?;
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_mtu = cfg.mtu as libc::c_int;
    ioctl(&sock, libc::SIOCSIFMTU, &mut req, "SIOCSIFMTU").map_err(|e| fail("mtu", e))?;
    set_up(&sock, name).map_err(|e| fail("up", e))?;

    // SAFETY: rtentry is plain data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(cfg.gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    let mut dev = *b"eth0\0";
    rt.rt_dev = dev.as_mut_ptr() as *mut libc::c_char;
    // SAFETY: SIOCADDRT reads one rtentry; `dev` outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT as _, &mut rt as *mut libc::rtentry) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(fail("default route", e));
        }
    }
    Ok(())
}

/// Kernel IPv6 settings for `eth0`, written before it goes up: no duplicate address
/// detection (nobody else is on the link, and a tentative address would fail the first
/// second of connections), no router advertisements or autoconfiguration (the address
/// is static). `false` when the kernel has no IPv6 (`/proc/sys/net/ipv6` is missing).
pub fn prepare_ipv6() -> Result<bool, String> {
    if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
        return Ok(false);
    }
    for dev in ["default", "eth0"] {
        for (key, value) in [("accept_dad", "0"), ("accept_ra", "0"), ("autoconf", "0")] {
            let path = format!("/proc/sys/net/ipv6/conf/{dev}/{key}");
            std::fs::write(&path, value).map_err(|e| format!("cannot write {path}: {e}"))?;
        }
    }
    Ok(true)
}

/// `struct in6_rtmsg` (linux/ipv6_route.h), for `SIOCADDRT` on an `AF_INET6` socket.
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

/// Gives the (already up) `eth0` its IPv6 address and an IPv6 default route through the
/// gateway.
pub fn configure_eth0_v6(cfg: &Net6Config) -> Result<(), String> {
    let fail = |what: &str, e: io::Error| format!("cannot configure eth0 for IPv6 ({what}): {e}");
    let sock4 = socket().map_err(|e| fail("socket", e))?;
    let mut req = ifreq(c"eth0");
    ioctl(&sock4, libc::SIOCGIFINDEX, &mut req, "SIOCGIFINDEX").map_err(|e| fail("interface index", e))?;
    // SAFETY: SIOCGIFINDEX filled the ifindex member of the union.
    let ifindex = unsafe { req.ifr_ifru.ifru_ifindex };
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail("socket", io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr = libc::in6_ifreq {
        ifr6_addr: libc::in6_addr { s6_addr: cfg.addr.octets() },
        ifr6_prefixlen: u32::from(cfg.prefix),
        ifr6_ifindex: ifindex,
    };
    // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads one in6_ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR as _, &mut addr as *mut libc::in6_ifreq) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(fail("address", e));
        }
    }
    let mut rt = In6Rtmsg {
        dst: libc::in6_addr { s6_addr: [0; 16] },
        src: libc::in6_addr { s6_addr: [0; 16] },
        gateway: libc::in6_addr { s6_addr: cfg.gateway.octets() },
        kind: 0,
        dst_len: 0,
        src_len: 0,
        metric: 1,
        info: 0,
        flags: u32::from(libc::RTF_UP | libc::RTF_GATEWAY),
        ifindex,
    };
    // SAFETY: SIOCADDRT on an AF_INET6 socket reads one in6_rtmsg.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT as _, &mut rt as *mut In6Rtmsg) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(fail("default route", e));
        }
    }
    Ok(())
}

/// `/etc/resolv.conf` content: the gateway answers DNS.
pub fn resolv_conf(cfg: &NetConfig) -> String {
    format!("# written by msb-agent: the sandbox's DNS is its gateway\nnameserver {}\n", cfg.gateway)
}

/// `/etc/hosts` with `existing` kept, minus earlier lines for our alias, plus the alias
/// line. Keeps `localhost` if the image had no file.
pub fn hosts_file(existing: Option<&str>, cfg: &NetConfig, hostname: &str) -> String {
    let mut out = String::new();
    match existing {
        Some(text) => {
            for line in text.lines() {
                if line.split_whitespace().skip(1).any(|w| w == HOST_ALIAS) {
                    continue;
                }
                out.push_str(line);
                out.push('\n');
            }
        }
        None => {
            out.push_str("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
            out.push_str(&format!("127.0.1.1\t{hostname}\n"));
        }
    }
    out.push_str(&format!("{}\t{HOST_ALIAS}\n", cfg.gateway));
    out
}

/// Writes `/etc/resolv.conf` and `/etc/hosts` in the (switched) root. Creates `/etc`
/// when the image has none; a read-only or odd root only loses name resolution, so the
/// caller reports these errors on the console and boots on.
pub fn write_name_files(cfg: &NetConfig, hostname: &str) -> Result<(), String> {
    let fail = |what: &str, e: io::Error| format!("cannot write {what}: {e}");
    std::fs::create_dir_all("/etc").map_err(|e| fail("/etc", e))?;
    // resolv.conf is often a dangling symlink into /run (systemd-resolved images):
    // replace the link instead of writing through it.
    if std::fs::symlink_metadata("/etc/resolv.conf").is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = std::fs::remove_file("/etc/resolv.conf");
    }
    std::fs::write("/etc/resolv.conf", resolv_conf(cfg)).map_err(|e| fail("/etc/resolv.conf", e))?;
    let existing = std::fs::read_to_string("/etc/hosts").ok();
    std::fs::write("/etc/hosts", hosts_file(existing.as_deref(), cfg, hostname))
        .map_err(|e| fail("/etc/hosts", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NetConfig {
        NetConfig { addr: Ipv4Addr::new(100, 96, 0, 2), prefix: 30, gateway: Ipv4Addr::new(100, 96, 0, 1), mtu: 1500 }
    }

    #[test]
    fn netmasks() {
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn hosts_keeps_lines_and_replaces_alias() {
        let old = "127.0.0.1 localhost\n10.0.0.9 host.microsandbox.internal\n# c\n";
        let out = hosts_file(Some(old), &cfg(), "h");
        assert_eq!(out, "127.0.0.1 localhost\n# c\n100.96.0.1\thost.microsandbox.internal\n");
        let fresh = hosts_file(None, &cfg(), "h");
        assert!(fresh.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(fresh.contains("127.0.1.1\th\n"));
        assert!(fresh.ends_with("100.96.0.1\thost.microsandbox.internal\n"));
    }

    #[test]
    fn resolv_names_gateway() {
        assert!(resolv_conf(&cfg()).contains("\nnameserver 100.96.0.1\n"));
    }
}
