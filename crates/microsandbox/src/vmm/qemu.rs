//! The QEMU driver: builds the `qemu-system-*` command line for a [`VmSpec`].
//!
//! Machine choice (measured, see DESIGN.md): `-M pc` with virtio-pci devices boots the
//! Debian cloud kernel quickly under TCG; `-M microvm` needs virtio-mmio command-line
//! devices that kernel lacks. The kernel is booted directly (`-kernel`), no firmware disk.

use std::path::PathBuf;

use super::{Accel, VmSpec};
use crate::error::{Error, Result};

/// The QEMU binary: `$MICROSANDBOX_QEMU`, else `qemu-system-<arch>` found on PATH.
pub fn binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MICROSANDBOX_QEMU").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let name = format!("qemu-system-{}", std::env::consts::ARCH);
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(&name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Runtime(format!(
                "{name} is not installed; install Debian's qemu-system-x86 package (or set MICROSANDBOX_QEMU)"
            ))
        })
}

/// Arguments (without the binary) that boot `spec`.
pub fn args(spec: &VmSpec) -> Vec<String> {
    let p = |p: &PathBuf| p.to_string_lossy().into_owned();
    let (accel, cpu) = match spec.accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Hvf => ("hvf", "host"),
        // `-cpu max` crashes the 6.1 kernel early under QEMU 7.2's TCG (measured);
        // the default model boots.
        Accel::Tcg => ("tcg,thread=multi", "qemu64"),
    };
    let mut a: Vec<String> = vec![
        "-M".into(), "pc".into(),
        // No ACPI PCI hotplug on the root bus: nothing is ever hot-plugged, and with it the
        // guest could eject its own devices through the PIIX4 eject register; without it
        // QEMU describes only the present slots to ACPI, which the guest kernel walks at
        // boot: ~13 ms less per cold boot under TCG (DESIGN.md, Performance).
        "-global".into(), "PIIX4_PM.acpi-root-pci-hotplug=off".into(),
        "-nodefaults".into(), "-no-user-config".into(), "-display".into(), "none".into(),
        "-no-reboot".into(),
        "-accel".into(), accel.into(),
        "-cpu".into(), cpu.into(),
        "-m".into(), format!("{}M", spec.memory_mib),
        "-smp".into(), spec.cpus.to_string(),
        "-kernel".into(), p(&spec.kernel),
        "-initrd".into(), p(&spec.initramfs),
        "-append".into(), spec.cmdline.clone(),
        "-chardev".into(), format!("file,id=console,path={}", p(&spec.console_log)),
        "-serial".into(), "chardev:console".into(),
        // werror/rerror=report: a host-side I/O failure (e.g. the host disk is full) is an
        // I/O error in the guest; QEMU's default would pause the VM on ENOSPC.
        "-drive".into(), format!("file={},if=none,id=root,format={},cache=unsafe,discard=unmap,werror=report,rerror=report", p(&spec.root_disk), spec.root_format),
        "-device".into(), "virtio-blk-pci,drive=root".into(),
        "-device".into(), "virtio-serial-pci".into(),
        "-chardev".into(), format!("socket,id=agent,path={}", p(&spec.agent_socket)),
        "-device".into(), format!("virtserialport,chardev=agent,name={}", microsandbox_protocol::AGENT_PORT_NAME),
    ];
    a.extend(nic_args(spec));
    a.extend(ram_args(spec));
    a.extend(volume_args(spec));
    a.extend(transfer_disk_args(spec));
    a.shrink_to_fit();
    a
}

/// The descriptor number at which QEMU inherits its end of the NIC's stream socketpair.
/// High enough that nothing else the supervisor opens before spawning QEMU sits there.
pub const NET_FD: i32 = 100;

/// The guest NIC: `-netdev stream` on an inherited, already connected socket (no socket
/// path anyone else could connect to), as a client (`server=off`: the fd is the
/// connection). `host_mtu` tells the guest driver the MTU; no offloads exist on this
/// back-end, so large frames are what keeps the guest's packet count down. `romfile=`:
/// no option ROM. QEMU would give the NIC its iPXE boot ROM (`efi-virtio.rom`, 249 KB),
/// which it loads at start and SeaBIOS copies and initialises at every boot, although the
/// kernel is booted directly and nothing network-boots; measured ~4-5 ms of QEMU CPU per
/// boot under TCG (DESIGN.md, "Guest network").
fn nic_args(spec: &VmSpec) -> Vec<String> {
    let Some(nic) = &spec.nic else { return Vec::new() };
    vec![
        "-netdev".into(),
        format!("stream,id=net0,server=off,addr.type=fd,addr.str={NET_FD}"),
        "-device".into(),
        format!("virtio-net-pci,netdev=net0,mac={},host_mtu={},romfile=", nic.mac, nic.mtu),
    ]
}

/// `volumes:` devices. virtio-fs needs the guest RAM in shared memory that `virtiofsd`
/// can map: a memfd backend (`share=on`) of the VM's size replaces the default RAM.
/// Block volumes are virtio-blk drives the guest finds by serial; `werror/rerror=report`
/// as for the root, so a full host disk is an I/O error in the guest, not a paused VM.
/// Guest RAM in a file ([`super::RamFile`]). QEMU 7.2 opens `mem-path` read-write even
/// for a private mapping (so the file cannot be 0400), and would punch holes into it for
/// a balloon or virtio-mem discard: none of those devices is ever added to such a VM.
fn ram_args(spec: &VmSpec) -> Vec<String> {
    let Some(r) = spec.ram_file.as_ref().filter(|_| spec.shares.is_empty()) else { return Vec::new() };
    vec![
        "-object".into(),
        format!(
            "memory-backend-file,id=msbram,size={}M,mem-path={},share={}",
            spec.memory_mib,
            r.path.to_string_lossy().replace(',', ",,"),
            if r.shared { "on" } else { "off" }
        ),
        "-machine".into(),
        "memory-backend=msbram".into(),
    ]
}

/// `args` with a template's RAM file ([`ram_args`]) replaced by anonymous memory of the
/// same size and name, for a run that loads a whole stream (resume, fork): every page
/// comes from the stream, so a private mapping of the template's file would only add a
/// copy-on-write fault per page, and the saved sandbox would depend on the file.
pub fn anonymous_ram(args: &[String]) -> Vec<String> {
    args.iter()
        .map(|a| match a.strip_prefix("memory-backend-file,id=msbram,") {
            Some(rest) => {
                let size = rest.split(',').find(|p| p.starts_with("size=")).unwrap_or("");
                format!("memory-backend-ram,id=msbram,{size}")
            }
            None => a.clone(),
        })
        .collect()
}

/// The options of a QEMU `-object`/`-drive` value, split at single commas (`,,` is a
/// literal comma), each as written (`key=value`).
fn split_opts(v: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().unwrap().push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().unwrap().push(c);
        }
    }
    out
}

/// The guest RAM of a VM started with `args` when it is a file mapped privately
/// ([`ram_args`] with `shared: false`: a template restore or a fork): the file and the
/// RAM's size in bytes. `None` for anonymous memory or a shared file.
pub fn private_ram_file(args: &[String]) -> Option<(PathBuf, u64)> {
    let v = args.iter().find(|a| a.starts_with("memory-backend-file,id=msbram,"))?;
    let opts = split_opts(v);
    let get = |k: &str| opts.iter().find_map(|o| o.strip_prefix(k).and_then(|r| r.strip_prefix('=')));
    if get("share") != Some("off") {
        return None;
    }
    let mib: u64 = get("size")?.strip_suffix('M')?.parse().ok()?;
    Some((PathBuf::from(get("mem-path")?), mib << 20))
}

/// `args` with the guest RAM mapped privately from `path` instead of its current file
/// (see [`private_ram_file`]; other arguments unchanged): a fork's RAM, copied from the
/// parent into a file of its own.
pub fn with_private_ram_file(args: &[String], path: &std::path::Path) -> Vec<String> {
    args.iter()
        .map(|a| match a.strip_prefix("memory-backend-file,id=msbram,") {
            Some(rest) => {
                let size = split_opts(rest).into_iter().find(|p| p.starts_with("size=")).unwrap_or_default();
                format!("memory-backend-file,id=msbram,{size},mem-path={},share=off", path.to_string_lossy().replace(',', ",,"))
            }
            None => a.clone(),
        })
        .collect()
}

/// Arguments for a VM that loads a device-state-only stream (a fork over a RAM file,
/// see `xen-save-devices-state` in the supervisor): such a stream has no configuration
/// section, which QEMU otherwise requires first. Only the loading side needs it.
pub const NO_CONFIGURATION_SECTION: [&str; 2] = ["-global", "migration.send-configuration=off"];

fn volume_args(spec: &VmSpec) -> Vec<String> {
    let mut a = Vec::new();
    if !spec.shares.is_empty() {
        a.push("-object".into());
        a.push(format!("memory-backend-memfd,id=msbmem,size={}M,share=on", spec.memory_mib));
        a.push("-machine".into());
        a.push("memory-backend=msbmem".into());
    }
    for (i, s) in spec.shares.iter().enumerate() {
        a.push("-chardev".into());
        a.push(format!("socket,id=vfs{i},path={}", s.socket.to_string_lossy()));
        a.push("-device".into());
        a.push(format!("vhost-user-fs-pci,chardev=vfs{i},tag={}", s.tag));
    }
    for (i, d) in spec.drives.iter().enumerate() {
        let ro = if d.readonly { ",readonly=on" } else { "" };
        a.push("-drive".into());
        a.push(format!(
            "file={},if=none,id=vol{i},format={},discard=unmap,werror=report,rerror=report{ro}",
            d.path.to_string_lossy().replace(',', ",,"),
            d.format
        ));
        a.push("-device".into());
        a.push(format!("virtio-blk-pci,drive=vol{i},serial={}", d.serial));
    }
    a
}

/// The bulk-transfer disk (see `sandbox::transfer`): last on the PCI bus, so the root
/// stays `/dev/vda`; the agent finds it by its serial. `cache=unsafe`: QEMU reads and
/// writes the host file through the host page cache, which the engine uses too, so both
/// see the same bytes; flushes are pointless for scratch data that no one keeps.
fn transfer_disk_args(spec: &VmSpec) -> Vec<String> {
    let Some(disk) = &spec.transfer_disk else { return Vec::new() };
    vec![
        "-drive".into(),
        // A full host disk fails the guest's request (the agent reports it) instead of
        // pausing the VM, as for the root disk.
        format!("file={},if=none,id=transfer,format=raw,cache=unsafe,werror=report,rerror=report", disk.to_string_lossy()),
        "-device".into(),
        format!("virtio-blk-pci,drive=transfer,serial={}", microsandbox_protocol::TRANSFER_DISK_SERIAL),
    ]
}

/// Kernel command line for a sandbox named `hostname` booted with `accel` and `cpus`
/// virtual CPUs.
pub fn cmdline(hostname: &str, loglevel: u8, accel: Accel, cpus: u32) -> String {
    // quiet: serial output is slow under TCG. panic=-1 + reboot=t: a dead guest ends the
    // VM (QEMU runs with -no-reboot) instead of hanging.
    //
    // Boot-time parameters (measured under TCG, see bench/README.md):
    // - acpi=noirq: PCI interrupts are routed from SeaBIOS's $PIR table instead of by
    //   evaluating the ACPI _PRT/link methods, which the AML interpreter does slowly:
    //   probing each virtio-pci device drops from ~250 ms to ~10 ms. ACPI itself (power
    //   button, tables) stays on. Needs the `pc` machine's SeaBIOS (qboot has no $PIR).
    //   But the kernel then finds no local APIC ("No local APIC present") and brings up
    //   ONE CPU whatever `-smp` says, so it is only for single-CPU guests: with `cpus` > 1
    //   the guest routes interrupts through ACPI and its APICs (slower device probes, but
    //   the CPUs asked for; MSI works there, so `pci=nomsi` is left out too).
    // - cryptomgr.notests: skips the boot-time self-tests of every registered crypto
    //   algorithm (~300 ms); they check implementations for bugs, not inputs, and the
    //   algorithms themselves are unchanged.
    // - pci=nomsi, under TCG only: the guest has no local APIC there (`-cpu qemu64`; its
    //   boot log says "No local APIC present", interrupts go through the 8259 PIC), so
    //   MSI-X cannot work: every virtio-pci probe first tried it and failed (the first
    //   time with two kernel WARNINGs and their stack dumps) before falling back to INTx.
    //   With the parameter the probes take INTx at once: the agent's boot from /init to
    //   Ready ~25 % shorter (DESIGN.md, Performance). KVM/HVF guests (`-cpu host`) keep MSI.
    //
    // Idle-time parameters: under TCG every guest wake-up costs host CPU, and an idle
    // sandbox must cost next to nothing (DESIGN.md, Performance: timer interrupts of an idle
    // guest 49/s → 5/s, with the agent's reaper poll, and 2.4 % → 0.2–0.3 % of a core):
    // - tsc=reliable: no clocksource watchdog checking the TSC against the HPET twice a
    //   second (QEMU's TSC follows the host clock);
    // - nowatchdog: no soft/hard lockup detector timers (under an overloaded host they only
    //   report the emulation being slow);
    // - sysctl.vm.compaction_proactiveness=0: no proactive memory compaction (kcompactd
    //   wakes every 500 ms for it);
    // - sysctl.vm.stat_interval=10: per-CPU memory statistics folded every 10 s, not every
    //   second (the folded counters drift by at most a per-CPU threshold meanwhile).
    let single_cpu = cpus <= 1;
    let irq_params = if single_cpu { "acpi=noirq " } else { "" };
    let accel_params = match accel {
        Accel::Tcg if single_cpu => "pci=nomsi ",
        _ => "",
    };
    format!(
        "console=ttyS0 quiet loglevel={loglevel} panic=-1 reboot=t {irq_params}cryptomgr.notests \
         {accel_params}tsc=reliable nowatchdog sysctl.vm.compaction_proactiveness=0 sysctl.vm.stat_interval=10 \
         rdinit=/init msb.hostname={hostname}"
    )
}

/// Longest kernel command line the guest kernel keeps (x86 `COMMAND_LINE_SIZE` is 2048
/// bytes with the NUL); a longer one is cut silently, which would lose the `init:` spec or
/// the mount list at its end.
pub const CMDLINE_MAX_BYTES: usize = 2047;

/// Refuses a command line the guest kernel would truncate. `init:` and `volumes:` share it.
pub fn check_cmdline(cmdline: &str) -> Result<()> {
    if cmdline.len() > CMDLINE_MAX_BYTES {
        return Err(Error::InvalidConfig(format!(
            "the guest kernel command line would be {} bytes, at most {CMDLINE_MAX_BYTES}: init: (its command, arguments and environment) and volumes: share it; shorten them or pass long values through a file (patches:)",
            cmdline.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_line_the_kernel_would_cut_is_refused() {
        assert!(check_cmdline(&"a".repeat(CMDLINE_MAX_BYTES)).is_ok());
        let e = check_cmdline(&"a".repeat(CMDLINE_MAX_BYTES + 1)).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
        assert!(e.to_string().contains("init:"), "{e}");
    }

    #[test]
    fn msi_is_off_only_where_the_guest_has_no_apic() {
        assert!(cmdline("h", 3, Accel::Tcg, 1).contains(" pci=nomsi "));
        assert!(!cmdline("h", 3, Accel::Kvm, 1).contains("nomsi"));
        assert!(!cmdline("h", 3, Accel::Hvf, 1).contains("nomsi"));
        // acpi=noirq leaves the guest without a local APIC, i.e. one CPU: only for one.
        for accel in [Accel::Tcg, Accel::Kvm, Accel::Hvf] {
            assert!(cmdline("h", 3, accel, 1).contains(" acpi=noirq "));
            let smp = cmdline("h", 3, accel, 2);
            assert!(!smp.contains("acpi=noirq") && !smp.contains("nomsi"), "{smp}");
        }
    }

    #[test]
    fn args_name_every_device() {
        let spec = VmSpec {
            accel: Accel::Tcg,
            cpus: 2,
            memory_mib: 256,
            kernel: "/k".into(),
            initramfs: "/i".into(),
            cmdline: cmdline("h", 3, Accel::Tcg, 1),
            root_disk: "/r".into(),
            root_format: "raw",
            agent_socket: "/a.sock".into(),
            console_log: "/c.log".into(),
            transfer_disk: None,
            nic: None,
            shares: vec![],
            drives: vec![],
            ram_file: None,
        };
        let a = args(&spec).join(" ");
        assert!(!a.contains("msbram"));
        let priv_args = args(&VmSpec { ram_file: Some(super::super::RamFile { path: "/t,1/ram".into(), shared: false }), ..spec.clone() });
        assert_eq!(private_ram_file(&priv_args), Some((PathBuf::from("/t,1/ram"), 256 << 20)));
        let moved = with_private_ram_file(&priv_args, std::path::Path::new("/c,2/fork.ram"));
        assert_eq!(private_ram_file(&moved), Some((PathBuf::from("/c,2/fork.ram"), 256 << 20)));
        assert_eq!(moved.len(), priv_args.len());
        let shared_args = args(&VmSpec { ram_file: Some(super::super::RamFile { path: "/t/ram".into(), shared: true }), ..spec.clone() });
        assert_eq!(private_ram_file(&shared_args), None);
        assert_eq!(private_ram_file(&args(&spec)), None);
        assert_eq!(private_ram_file(&anonymous_ram(&priv_args)), None);
        let ram = |shared| args(&VmSpec { ram_file: Some(super::super::RamFile { path: "/t,1/ram".into(), shared }), ..spec.clone() }).join(" ");
        assert!(ram(true).contains("-object memory-backend-file,id=msbram,size=256M,mem-path=/t,,1/ram,share=on -machine memory-backend=msbram"));
        assert!(ram(false).contains("mem-path=/t,,1/ram,share=off"));
        let anon = anonymous_ram(&args(&VmSpec { ram_file: Some(super::super::RamFile { path: "/t/ram".into(), shared: false }), ..spec.clone() })).join(" ");
        assert!(anon.contains("-object memory-backend-ram,id=msbram,size=256M -machine memory-backend=msbram"), "{anon}");
        assert!(!anon.contains("mem-path"));
        assert!(a.contains("-accel tcg,thread=multi"));
        assert!(a.contains("-global PIIX4_PM.acpi-root-pci-hotplug=off"), "no slot the guest could eject");
        assert!(a.contains("-smp 2") && a.contains("-m 256M"));
        assert!(a.contains("socket,id=agent,path=/a.sock"));
        assert!(a.contains("name=msb.agent"));
        assert!(a.contains("werror=report,rerror=report"), "a full host disk must not pause the VM");
        assert!(!a.contains("transfer"));
        assert!(!a.contains("netdev"), "no NIC unless asked");
        let with_nic = args(&VmSpec { nic: Some(super::super::Nic { mac: "02:00:00:00:00:02".into(), mtu: 9000 }), ..spec.clone() }).join(" ");
        assert!(with_nic.contains("-netdev stream,id=net0,server=off,addr.type=fd,addr.str=100 -device virtio-net-pci,netdev=net0,mac=02:00:00:00:00:02,host_mtu=9000,romfile="), "{with_nic}");
        assert!(!a.contains("memory-backend"), "shared memory only for virtio-fs");
        let vols = VmSpec {
            shares: vec![crate::volume::mount::VirtiofsShare { tag: "msbfs0".into(), dir: "/d".into(), readonly: false, socket: "/s0".into() }],
            drives: vec![crate::volume::mount::BlockDrive { serial: "msbvol0".into(), path: "/v,1.raw".into(), format: "raw".into(), readonly: true }],
            ..spec.clone()
        };
        let v = args(&vols).join(" ");
        assert!(v.contains("-object memory-backend-memfd,id=msbmem,size=256M,share=on -machine memory-backend=msbmem"), "{v}");
        assert!(v.contains("-chardev socket,id=vfs0,path=/s0 -device vhost-user-fs-pci,chardev=vfs0,tag=msbfs0"), "{v}");
        assert!(v.contains("-drive file=/v,,1.raw,if=none,id=vol0,format=raw,discard=unmap,werror=report,rerror=report,readonly=on -device virtio-blk-pci,drive=vol0,serial=msbvol0"), "{v}");
        let a = args(&VmSpec { transfer_disk: Some("/t.raw".into()), ..spec }).join(" ");
        assert!(a.ends_with("-drive file=/t.raw,if=none,id=transfer,format=raw,cache=unsafe,werror=report,rerror=report -device virtio-blk-pci,drive=transfer,serial=msb.transfer"), "{a}");
    }
}
