# frozen_string_literal: true

require_relative "../support/registry"

# Sandbox#fork: a running copy of a running sandbox (memory, processes, disk), with its own
# identity, diverging from the parent afterwards.
RSpec.describe "Sandbox#fork" do
  it "copies a running sandbox's memory, processes and disk into a new running sandbox with its own identity" do
    parent_name = unique_name("fork-p")
    child_name = unique_name("fork-c")
    Microsandbox::Sandbox.create(parent_name, image: rootfs, memory: 256) do |parent|
      pid = parent.shell("sleep 1000 > /dev/null 2>&1 & echo $!").stdout.strip
      parent.shell("echo before > /root/f")
      parent_rand = parent.shell("od -An -tx1 -N32 /dev/urandom | tr -d ' \\n'").stdout
      parent_machine_id = parent.shell("cat /etc/machine-id").stdout

      parent.fork(child_name) do |child|
        expect(child.info[:start]).to eq("forked")
        expect(child.name).to eq(child_name)
        expect(child.shell("kill -0 #{pid} && echo alive").stdout).to eq("alive\n") # the parent's process, copied
        expect(child.shell("cat /root/f").stdout).to eq("before\n") # the page cache and the disk came along
        expect(child.shell("hostname").stdout.strip).to eq(child_name)
        expect(child.shell("cat /etc/machine-id").stdout).to match(/\A\h{32}\n\z/)
        expect(child.shell("cat /etc/machine-id").stdout).not_to eq(parent_machine_id)
        child_rand = child.shell("od -An -tx1 -N32 /dev/urandom | tr -d ' \\n'").stdout
        expect(child_rand.size).to eq(64)
        expect(child_rand).not_to eq(parent_rand)
        expect(child.shell("od -An -tx1 -N32 /dev/urandom | tr -d ' \\n'").stdout)
          .not_to eq(parent.shell("od -An -tx1 -N32 /dev/urandom | tr -d ' \\n'").stdout)

        # They diverge.
        child.shell("echo child > /root/f; sync")
        parent.shell("echo parent > /root/g")
        expect(parent.shell("cat /root/f").stdout).to eq("before\n")
        expect(child.shell("cat /root/g 2>&1").exit_code).not_to eq(0)
        expect(parent.shell("hostname").stdout.strip).to eq(parent_name)
      end
      expect(parent).to be_running
      expect(parent.shell("echo still").stdout).to eq("still\n")
      expect { parent.fork(parent_name) }.to raise_error(Microsandbox::SandboxAlreadyExistsError)
      expect(Dir.glob(File.join(sandbox_dir(parent_name), "fork-*"))).to be_empty
    end
    expect(Dir.glob(File.join(sandbox_dir(child_name), "*.state"))).to be_empty
  ensure
    [parent_name, child_name].each { |n| Microsandbox::Sandbox.remove(n) if Microsandbox::Sandbox.list.any? { |s| s.name == n } }
  end

  # A restored sandbox's RAM is a file mapped privately: the fork copies the memory into a
  # file of its own (device state only through the FIFO), and so does a fork of the fork.
  it "forks a sandbox restored from a template (a NIC, a disk chain on the template's layer, memory copied to a file)" do
    ref = MicrosandboxSpec::Registry.instance.push_dir("team/fork", "1.0", MicrosandboxSpec::Rootfs.busybox_dir,
                                                       env: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
    names = [unique_name("fork-tp"), unique_name("fork-tc"), unique_name("fork-tg")]
    tmpfs_sum = "mkdir -p /mnt/m && mount -t tmpfs tmpfs /mnt/m && " \
                "dd if=/dev/urandom of=/mnt/m/r bs=1M count=16 2>/dev/null && md5sum /mnt/m/r"
    Microsandbox::Sandbox.create(names[0], image: ref, registry_insecure: true, memory: 256) do |parent|
      expect(parent.info[:start]).to eq("restored")
      parent.shell("echo x > /root/x")
      sum = parent.shell(tmpfs_sum).stdout
      parent.shell("echo before > /mnt/m/w")
      parent.fork(names[1]) do |child|
        expect(child.info[:start]).to eq("forked")
        expect(child.shell("cat /root/x; hostname").stdout).to eq("x\n#{names[1]}\n")
        expect(child.shell("grep 127.0.1.1 /etc/hosts").stdout).to include(names[1]) # its hostname line follows
        expect(child.shell("md5sum /mnt/m/r").stdout).to eq(sum) # 16 MiB of guest RAM, byte for byte
        # The copy's name is gone once loaded (QEMU holds it); nothing else is left.
        expect(Dir.children(sandbox_dir(names[1]))).not_to include("fork.ram", "fork.fifo", "root.qcow2.part")
        # Memory diverges both ways: neither sees the other's later writes.
        parent.shell("echo parent > /mnt/m/w")
        child.shell("echo child > /mnt/m/w")
        expect(parent.shell("cat /mnt/m/w").stdout).to eq("parent\n")
        expect(child.shell("cat /mnt/m/w").stdout).to eq("child\n")
        child.fork(names[2]) do |grandchild|
          expect(grandchild.shell("cat /mnt/m/w; hostname").stdout).to eq("child\n#{names[2]}\n")
          expect(grandchild.shell("md5sum /mnt/m/r").stdout).to eq(sum)
        end
        expect(child.shell("cat /mnt/m/w").stdout).to eq("child\n")
      end
      expect(parent.shell("cat /mnt/m/w").stdout).to eq("parent\n")
    end
  ensure
    names.each { |n| Microsandbox::Sandbox.remove(n) if Microsandbox::Sandbox.list.any? { |s| s.name == n } }
  end

  it "refuses to fork or pause a sandbox with a host volume, which keeps running untouched" do
    name = unique_name("fork-v")
    host_dir = Dir.mktmpdir("fork-vol")
    File.write(File.join(host_dir, "seen"), "host\n")
    Microsandbox::Sandbox.create(name, image: rootfs, memory: 256, volumes: { "/data" => host_dir }) do |sb|
      child = unique_name("fork-vc")
      expect { sb.fork(child) }.to raise_error(Microsandbox::UnsupportedError, /host volumes/)
      expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(child)
      expect { sb.pause }.to raise_error(Microsandbox::UnsupportedError, /host volumes/)
      expect(sb.shell("cat /data/seen").stdout).to eq("host\n")
    end
  ensure
    FileUtils.remove_entry(host_dir) if host_dir
  end

  it "refuses a stopped sandbox and leaves no record behind" do
    name = unique_name("fork-s")
    sb = Microsandbox::Sandbox.create(name, image: rootfs, memory: 256)
    sb.stop
    expect { sb.fork(unique_name("fork-x")) }.to raise_error(Microsandbox::SandboxNotRunningError)
  ensure
    Microsandbox::Sandbox.remove(name)
  end
end
