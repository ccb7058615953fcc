# frozen_string_literal: true

require "open3"
require "json"
require "tmpdir"

# Microsandbox.doctor and `microsandbox doctor` on this host, plus the KVM
# classification on stand-in device and cpuinfo files (each case the engine
# distinguishes). Nothing boots.
RSpec.describe "doctor" do
  def exe = File.expand_path("../../exe/microsandbox", __dir__)
  def lib = File.expand_path("../../lib", __dir__)

  def doctor_cli(*args, env: {})
    out, err, status = Open3.capture3(env, RbConfig.ruby, "-I", lib, exe, *args, "doctor")
    [out, err, status.exitstatus]
  end

  describe ".kvm_status" do
    around do |example|
      Dir.mktmpdir("msb-doctor") do |dir|
        @dir = dir
        example.run
      end
    end

    def cpuinfo(flags)
      path = File.join(@dir, "cpuinfo")
      File.write(path, "processor\t: 0\nflags\t\t: fpu vme #{flags}\n\nprocessor\t: 1\nflags\t\t: fpu vme #{flags}\n")
      path
    end

    def device
      path = File.join(@dir, "kvm")
      File.write(path, "")
      File.chmod(0o600, path)
      path
    end

    it "is :missing_device without the device node" do
      state, why = Microsandbox::Doctor.kvm_status(device: File.join(@dir, "none"), cpuinfo: cpuinfo("vmx"))
      expect(state).to eq(:missing_device)
      expect(why).to include("does not exist", "nested virtualization")
    end

    it "is :usable when the device opens and the CPU has VMX or SVM" do
      expect(Microsandbox::Doctor.kvm_status(device: device, cpuinfo: cpuinfo("vmx sse")).first).to eq(:usable)
      expect(Microsandbox::Doctor.kvm_status(device: device, cpuinfo: cpuinfo("svm")).first).to eq(:usable)
    end

    it "is :no_virtualization when the device opens but the CPU advertises neither (the nested case)" do
      state, why = Microsandbox::Doctor.kvm_status(device: device, cpuinfo: cpuinfo("sse vmxnet"))
      expect(state).to eq(:no_virtualization)
      expect(why).to include("no VMX/SVM")
    end

    it "is :permission when this user cannot open the device read-write" do
      path = device
      info = cpuinfo("vmx")
      if Process.uid.zero?
        # root opens anything: ask as nobody, in a child
        File.chmod(0o711, @dir)
        reader, writer = IO.pipe
        pid = fork do
          reader.close
          Process::Sys.setgid(65_534)
          Process::Sys.setuid(65_534)
          writer.write(Microsandbox::Doctor.kvm_status(device: path, cpuinfo: info).first.to_s)
          exit!(0)
        end
        writer.close
        state = reader.read
        Process.wait(pid)
        expect(state).to eq("permission")
      else
        File.chmod(0o000, path)
        expect(Microsandbox::Doctor.kvm_status(device: path, cpuinfo: info).first).to eq(:permission)
      end
    end
  end

  describe "on this host" do
    let(:kvm) { Microsandbox::Doctor.kvm_status.first }

    it "reports the accelerator sandboxes will use: KVM, or software emulation as a warning, not a failure" do
      report = Microsandbox.doctor
      expect(report).to be_a(Microsandbox::Doctor::Report)
      expect(report["qemu"].status).to eq(:ok)
      expect(report["qemu"].summary).to match(/qemu-system-\S+ \d+\.\d+/)
      expect(report["disk space"].summary).to match(/GiB free under /)
      if ENV.fetch("MICROSANDBOX_ACCEL", "auto").match?(/\A(auto|)\z/) && kvm != :usable
        expect(report.accel).to eq("tcg")
        expect(report.software_emulation?).to be(true)
        expect(report["accelerator"].status).to eq(:warn)
        expect(report["accelerator"].summary).to include("will use software emulation (TCG), about 10x slower")
        expect(report["accelerator"].fix).not_to be_nil
      elsif kvm == :usable
        expect(report.accel).to eq("kvm")
        expect(report["accelerator"].status).to eq(:ok)
      end
      expect(report.ok?).to be(true)

      out, err, status = doctor_cli
      expect([err, status]).to eq(["", 0])
      expect(out).to include("accelerator: ", "qemu: ", "This host can run sandboxes (#{report.accel}).")
      out, _, status = doctor_cli("--json")
      doc = JSON.parse(out)
      expect([doc["ok"], doc["accel"], status]).to eq([true, report.accel, 0])
      expect(doc["checks"].map { |c| c["name"] }).to include("accelerator", "qemu", "guest kernel", "disk tools", "disk space")
    end

    it "checks virtiofsd only when the gem has volumes" do
      report = with_env("MICROSANDBOX_VIRTIOFSD" => "/nonexistent/virtiofsd") { Microsandbox.doctor }
      if Microsandbox.const_defined?(:Volume, false)
        expect(report["virtiofsd"].status).to eq(:warn)
        expect(report["virtiofsd"].summary).to start_with("/nonexistent/virtiofsd is missing")
        expect(report.ok?).to be(true) # sandboxes without shared directories still boot
      else
        expect(report["virtiofsd"]).to be_nil
      end
    end

    it "fails (exit 1) and names the package when QEMU is not on PATH" do
      Dir.mktmpdir("msb-path") do |bin|
        # Everything doctor looks for except QEMU.
        (Microsandbox::Doctor::TOOLS.keys + %w[df apt-get]).each do |tool|
          found = ENV["PATH"].split(":").map { |d| File.join(d, tool) }.find { |p| File.executable?(p) }
          File.symlink(found, File.join(bin, tool)) if found
        end
        out, _, status = doctor_cli(env: { "PATH" => bin, "MICROSANDBOX_QEMU" => nil })
        expect(status).to eq(1)
        expect(out).to match(/^\[FAIL\] qemu: qemu-system-\S+ is not on PATH$/)
        expect(out).to include("-> install Debian's qemu-system-x86 package", "No sandbox can boot on this host")
        expect(out).to match(/^\[ok  \] disk tools: /)
        out, _, status = doctor_cli("--json", env: { "PATH" => bin, "MICROSANDBOX_QEMU" => nil })
        expect(status).to eq(1)
        doc = JSON.parse(out)
        expect(doc["ok"]).to be(false)
        expect(doc["checks"].find { |c| c["name"] == "qemu" }["status"]).to eq("error")
      end
    end

    it "fails when MICROSANDBOX_ACCEL=kvm asks for KVM the host cannot give, and warns for tcg" do
      report = with_env("MICROSANDBOX_ACCEL" => "tcg") { Microsandbox.doctor }
      expect([report.accel, report["accelerator"].status, report.ok?]).to eq(["tcg", :warn, true])
      next if kvm == :usable

      report = with_env("MICROSANDBOX_ACCEL" => "kvm") { Microsandbox.doctor }
      expect([report["accelerator"].status, report.ok?]).to eq([:error, false])
    end
  end

  def with_env(vars)
    saved = vars.keys.to_h { |k| [k, ENV.fetch(k, nil)] }
    vars.each { |k, v| ENV[k] = v }
    yield
  ensure
    saved.each { |k, v| ENV[k] = v }
  end
end
