//! Runs the stack for a QEMU started by hand, without a sandbox: the benchmark
//! (`bench/net.rb`) uses it to time our stack in the same bare VM as its slirp and passt
//! baselines, so a difference between them is the stack's, not the sandbox's (agent,
//! exec session, disks).
//!
//! ```text
//! stack_vm <dns port on 127.0.0.1> <qemu binary> <qemu args...>
//! ```
//!
//! QEMU gets `-netdev stream` on one end of a socketpair (as the supervisor does) and a
//! `virtio-net-pci` NIC with the stack's guest MAC and MTU; the guest must configure
//! 172.16.0.2/30 via 172.16.0.1 itself. Policy `allow_all` (the gateway is host
//! loopback), DNS forwarded to the given port. QEMU dies with this process; this process
//! ends when QEMU does.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::sync::Arc;

use microsandbox_network::dns::Nameserver;
use microsandbox_network::policy::NetworkPolicy;
use microsandbox_network::stack::{Counters, Stack};
use microsandbox_network::NetworkConfig;

/// Where QEMU finds its end of the link (as the supervisor's `qemu::NET_FD`).
const NET_FD: i32 = 100;

fn main() -> ExitCode {
    // The supervisor's allocator settings (its `fixed_mmap_threshold`), so the stack runs
    // here as it does in a sandbox: with glibc's defaults a fresh process faulted its
    // frames in during the first burst and not after, the supervisor the other way round
    // until it set the trim threshold too (DESIGN.md, "Downloads at MTU 65520").
    // SAFETY: mallopt only changes allocator parameters; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 * 1024 * 1024);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(port), Some(qemu)) = (args.first().and_then(|p| p.parse::<u16>().ok()), args.get(1)) else {
        eprintln!("usage: stack_vm <dns port> <qemu binary> <qemu args...>");
        return ExitCode::from(2);
    };
    let mut cfg = NetworkConfig::with_defaults();
    cfg.policy = NetworkPolicy::allow_all();
    cfg.dns.nameservers = vec![Nameserver::Addr(SocketAddr::from(([127, 0, 0, 1], port)))];
    let (ours, theirs) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("stack_vm: socketpair: {e}");
            return ExitCode::from(1);
        }
    };
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(qemu);
    cmd.args(&args[2..]).args([
        "-netdev".to_string(),
        format!("stream,id=n0,server=off,addr.type=fd,addr.str={NET_FD}"),
        "-device".to_string(),
        format!("virtio-net-pci,netdev=n0,mac={},host_mtu={}", cfg.guest_mac_string(), cfg.mtu),
    ]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 leaves the new descriptor without FD_CLOEXEC: QEMU inherits it.
            if libc::dup2(fd, NET_FD) < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stack_vm: cannot start {qemu}: {e}");
            return ExitCode::from(1);
        }
    };
    drop(theirs);
    let stack = match Stack::new(ours, cfg, Arc::new(Counters::default()), Box::new(|line: &str| eprintln!("{line}"))) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stack_vm: {e}");
            let _ = child.kill();
            return ExitCode::from(1);
        }
    };
    let net = std::thread::spawn(move || stack.run());
    let status = child.wait();
    let _ = net.join();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}
