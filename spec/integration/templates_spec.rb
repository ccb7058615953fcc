# frozen_string_literal: true

require "digest"
require "fileutils"
require_relative "../support/registry"

# Templates (warm starts): creates of one configuration restore a VM saved once instead of
# booting; each restored sandbox gets its own randomness, clock, hostname and disk layer.
RSpec.describe "templates (restoring booted VMs)" do
  before(:all) do
    # An image of its own: its templates belong to this file alone.
    @ref = MicrosandboxSpec::Registry.instance.push_dir("team/warm", "1.0", MicrosandboxSpec::Rootfs.busybox_dir,
                                                         env: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
  end

  let(:opts) { { image: @ref, registry_insecure: true, memory: 256 } }
  let(:templates_dir) { File.join(ENV.fetch("MICROSANDBOX_HOME"), "templates") }

  def template_dir(sb)
    File.join(templates_dir, sb.info.fetch(:template))
  end

  def system_log(sb)
    sb.logs(sources: ["system"]).map(&:text).join("\n")
  end

  # A sandbox that is removed after the block: a stopped sandbox's disk still uses its
  # template's disk layer, which keeps a damaged template from being replaced.
  def sandbox(prefix, **extra, &block)
    name = unique_name(prefix)
    Microsandbox::Sandbox.create(name, **opts, **extra, &block)
  ensure
    Microsandbox::Sandbox.remove(name) if name && Microsandbox::Sandbox.list.any? { |s| s.name == name }
  end

  it "restores creates of one configuration from one template, each with its own identity and disk" do
    dir = nil
    sandbox("warm-a") do |a|
      dir = template_dir(a)
      sandbox("warm-b") do |b|
        a_name = a.name
        b_name = b.name
        [a, b].each { |sb| expect(sb.info[:start]).to eq("restored") }
        [a, b].each { |sb| expect(sb.info).not_to have_key(:boot_phases) }
        expect(a.info[:template]).to match(/\A\h{64}\z/)
        expect(b.info[:template]).to eq(a.info[:template])

        random = [a, b].map { |sb| sb.shell("od -An -tx1 -N32 /dev/urandom | tr -d ' \\n'").stdout }
        expect(random.map(&:size)).to eq([64, 64])
        expect(random[0]).not_to eq(random[1])
        boot_ids = [a, b].map { |sb| sb.shell("cat /proc/sys/kernel/random/boot_id").stdout.strip }
        expect(boot_ids[0]).to match(/\A\h{8}-/)
        expect(boot_ids[0]).not_to eq(boot_ids[1])
        # The template's disk has the machine id its boot wrote; each restore writes its own.
        machine_ids = [a, b].map { |sb| sb.shell("cat /etc/machine-id").stdout }
        machine_ids.each { |m| expect(m).to match(/\A\h{12}4\h{3}[89ab]\h{15}\n\z/) }
        expect(machine_ids[0]).not_to eq(machine_ids[1])

        expect(a.shell("hostname").stdout.strip).to eq(a_name)
        expect(b.shell("hostname").stdout.strip).to eq(b_name)
        expect(b.shell("grep -c '127.0.1.1' /etc/hosts; grep 127.0.1.1 /etc/hosts").stdout).to include(b_name)
        guest_clock = b.shell("date +%s").stdout.to_i
        expect(guest_clock).to be_within(30).of(Time.now.to_i)

        a.shell("echo only-a > /root/mine")
        expect(b.shell("cat /root/mine 2>&1").exit_code).not_to eq(0)
        expect(a.shell("cat /root/mine").stdout).to eq("only-a\n")
      end
    end
    # Private to the owner: the saved RAM may hold anything the guest had at its ready state.
    expect(File.stat(dir).mode & 0o777).to eq(0o700)
    %w[vm.state disk.qcow2 ram].each { |f| expect(File.stat(File.join(dir, f)).mode & 0o077).to eq(0) }
  end

  it "keeps a restored sandbox's memory writes out of the template's RAM file, and pauses and resumes it whole" do
    sandbox("warm-m") do |sb|
      ram = File.join(template_dir(sb), "ram")
      before = Digest::SHA256.file(ram).hexdigest
      # 32 MiB of random bytes in guest RAM (tmpfs): copy-on-write pages of this sandbox alone.
      pid = sb.shell("mkdir -p /mnt/t && mount -t tmpfs tmpfs /mnt/t && " \
                     "dd if=/dev/urandom of=/mnt/t/r bs=1M count=32 2>/dev/null && md5sum /mnt/t/r > /root/sum && " \
                     "{ sleep 1000 > /dev/null 2>&1 & echo $!; }").stdout.strip
      expect(pid).to match(/\A\d+\z/)
      sb.pause
      # The private mapping goes into the paused state in full (not only what differs from the file).
      expect(File.size(File.join(sandbox_dir(sb.name), "paused.state"))).to be > 32 * 1024 * 1024
      sb.resume
      expect(sb.info[:start]).to eq("resumed")
      expect(sb.shell("kill -0 #{pid} && md5sum -c /root/sum").stdout).to eq("/mnt/t/r: OK\n")
      expect(Digest::SHA256.file(ram).hexdigest).to eq(before)
    end
  end

  it "boots cold with template: false or MICROSANDBOX_TEMPLATES=off (template: true wins)" do
    sandbox("warm-off", template: false) do |sb|
      expect(sb.info).to include(start: "booted", template: nil)
      expect(sb.shell("hostname").stdout.strip).to eq(sb.name)
      # The busybox image has no /etc/machine-id: a cold boot writes one (systemd semantics).
      expect(sb.shell("cat /etc/machine-id; stat -c %a /etc/machine-id").stdout).to match(/\A\h{32}\n444\n\z/)
    end
    ENV["MICROSANDBOX_TEMPLATES"] = "off"
    begin
      sandbox("warm-env") { |sb| expect(sb.info[:start]).to eq("booted") }
      sandbox("warm-on", template: true) { |sb| expect(sb.info[:start]).to eq("restored") }
    ensure
      ENV.delete("MICROSANDBOX_TEMPLATES")
    end
    expect { sandbox("warm-bad", template: "yes") }.to raise_error(TypeError, /template/)
  end

  it "boots cold with a system log entry when the state file is truncated, then rebuilds the template" do
    dir = sandbox("warm-t0") { |sb| template_dir(sb) }
    state = File.join(dir, "vm.state")
    File.chmod(0o600, state)
    File.truncate(state, File.size(state) / 2)
    sandbox("warm-t1") do |sb|
      expect(sb.info[:start]).to eq("booted")
      expect(sb.shell("echo ok").stdout).to eq("ok\n")
      expect(system_log(sb)).to match(/template \h+ was damaged \(its state file has \d+ bytes, \d+ were saved\)/)
    end
    dir = sandbox("warm-t2") do |sb|
      expect(sb.info[:start]).to eq("restored")
      template_dir(sb)
    end
    File.truncate(File.join(dir, "ram"), 4096)
    sandbox("warm-t3") do |sb|
      expect(sb.info[:start]).to eq("booted")
      expect(system_log(sb)).to match(/template \h+ was damaged \(its RAM file has 4096 bytes, \d+ were saved\)/)
    end
  end

  it "boots cold with a system log entry when QEMU refuses a corrupt state file" do
    dir = sandbox("warm-c0") { |sb| template_dir(sb) }
    state = File.join(dir, "vm.state")
    File.chmod(0o600, state)
    File.open(state, "r+b") { |f| f.write("\0" * 4096) } # same size, no migration header
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    sandbox("warm-c1") do |sb|
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 120
      expect(sb.info[:start]).to eq("booted")
      expect(sb.shell("echo ok").stdout).to eq("ok\n")
      expect(system_log(sb)).to include("restoring from a template failed, booting cold")
    end
    expect(processes_mentioning(dir)).to be_empty
  end

  it "counts template users in Image.remove and removes the image's templates with it" do
    ref = MicrosandboxSpec::Registry.instance.push_dir("team/warm-rm", "1.0", MicrosandboxSpec::Rootfs.busybox_dir,
                                                       env: ["PATH=/bin", "WARM_RM=#{unique_name('x')}"])
    name = unique_name("warm-rm")
    dir = Microsandbox::Sandbox.create(name, image: ref, registry_insecure: true, memory: 256) do |sb|
      expect(sb.info[:start]).to eq("restored")
      template_dir(sb)
    end
    expect { Microsandbox::Image.remove(ref) }.to raise_error(Microsandbox::ImageInUseError, /#{name}/)
    Microsandbox::Sandbox.remove(name)
    Microsandbox::Image.remove(ref)
    expect(File.exist?(dir)).to be(false)
    expect(File.exist?("#{dir}.lock")).to be(false) # its build lock goes with it
  end
end
