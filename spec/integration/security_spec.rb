# frozen_string_literal: true

# security: "restricted" — enforced by the guest agent for every process it starts.
RSpec.describe "security profiles" do
  status_of = ->(sb, **opts) { sb.shell("grep -E '^(NoNewPrivs|CapEff|CapBnd):' /proc/self/status", **opts).stdout }

  it "restricted: no new privileges and no capabilities, for exec, streams, terminals, the main process and other handles" do
    main = ["sh", "-c", "grep -E '^(NoNewPrivs|CapEff):' /proc/self/status > /tmp/main-status"]
    Microsandbox::Sandbox.create(unique_name("restricted"), image: rootfs, security: :restricted, entrypoint: main) do |sb|
      expect(status_of.call(sb)).to match(/NoNewPrivs:\s+1\n/).and match(/CapEff:\s+0{16}\n/).and match(/CapBnd:\s+0{16}\n/)
      expect(sb.exec("id", ["-u"]).stdout).to eq("0\n") # still uid 0, without its privileges
      out = sb.shell("mkdir -p /tmp/m && mount -t tmpfs none /tmp/m; echo rc=$?; " \
                     "touch /tmp/f && chown 1000 /tmp/f; echo rc=$?")
      expect(out.stdout).to eq("rc=1\nrc=1\n")
      expect(out.stderr).to match(/mount.*(denied|not permitted)/i).and match(/chown.*not permitted/i)
      expect(sb.exec_stream("grep", ["CapEff", "/proc/self/status"]).collect.stdout).to match(/CapEff:\s+0{16}/)
      expect(status_of.call(sb, tty: true)).to match(/NoNewPrivs:\s+1/)
      expect(status_of.call(sb, user: "nobody")).to match(/CapBnd:\s+0{16}/)
      expect(wait_until(timeout: 30) { sb.fs.exists?("/tmp/main-status") }).to be(true)
      expect(sb.fs.read_text("/tmp/main-status")).to match(/NoNewPrivs:\s+1\n/).and match(/CapEff:\s+0{16}\n/)
      # A handle from a lookup (another process would get the same) keeps the profile.
      expect(status_of.call(Microsandbox::Sandbox.get(sb.name))).to match(/CapEff:\s+0{16}/)
      # The host's filesystem calls are not commands: they still work on root's files.
      sb.fs.write("/root/host-written", "x")
      expect(sb.fs.read("/root/host-written")).to eq("x")
    end
  end

  it "the guest has no hot-plug slots, so it cannot eject its own disks, NIC or agent port" do
    Microsandbox::Sandbox.create(unique_name("slots"), image: rootfs) do |sb|
      # With ACPI PCI hotplug on the root bus the guest would list 30 ejectable slots here.
      expect(sb.shell("ls /sys/bus/pci/slots | wc -l").stdout.strip).to eq("0")
      expect(sb.shell("ls /sys/bus/pci/devices | wc -l").stdout.to_i).to be >= 6 # sysfs is there
    end
  end

  it "default: root keeps its capabilities" do
    Microsandbox::Sandbox.create(unique_name("default"), image: rootfs, security: "default") do |sb|
      expect(status_of.call(sb)).to match(/NoNewPrivs:\s+0\n/).and match(/CapEff:\s+0*[1-9a-f][0-9a-f]*\n/)
      expect(sb.shell("mkdir -p /tmp/m && mount -t tmpfs none /tmp/m && echo mounted").stdout).to eq("mounted\n")
    end
  end
end
