# frozen_string_literal: true

# Create options of the reference gem 0.9.0 that apply to the whole sandbox.
RSpec.describe "sandbox-wide create options" do
  it "applies rlimits:, log_level:, quiet_logs: and coerces env and label values" do
    Microsandbox::Sandbox.create(unique_name("opts"), image: rootfs, rlimits: { nofile: 123 }, log_level: :info,
                                                      quiet_logs: true, env: { "N" => 7 }, labels: { "n" => 1 }) do |sb|
      expect(sb.shell("ulimit -n").stdout).to eq("123\n")
      expect(sb.shell("ulimit -n", rlimits: { nofile: 99 }).stdout).to eq("99\n") # an exec's own limit wins
      expect(sb.exec_stream("sh", ["-c", "ulimit -n"]).collect.stdout).to eq("123\n")
      expect(sb.shell("echo $N").stdout).to eq("7\n")
      expect(sb.labels).to eq("n" => "1")
      expect(sb.fs.read_text("/proc/cmdline")).to include("loglevel=7")
      sb.exec("echo", ["quiet-marker"])
      expect(sb.logs(sources: ["stdout"]).map(&:text).join).not_to include("quiet-marker")
    end
  end

  it "gives the guest the CPUs cpus: asks for" do
    # The single-CPU boot shortcut (acpi=noirq) leaves the kernel without a local APIC,
    # i.e. with one CPU whatever QEMU's -smp says: it must not be used for more.
    Microsandbox::Sandbox.create(unique_name("cpus"), image: rootfs, cpus: 2) do |sb|
      expect(sb.shell("grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online").stdout).to eq("2\n0-1\n")
      expect(sb.fs.read_text("/proc/cmdline")).not_to include("acpi=noirq")
    end
  end
end
