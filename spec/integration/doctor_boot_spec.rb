# frozen_string_literal: true

require "open3"
require "json"
require "tmpdir"

# `doctor --boot` / Microsandbox.doctor(boot: true): a real throwaway sandbox.
RSpec.describe "doctor with a boot check" do
  def doctor_cli(*args, env: {})
    out, err, status = Open3.capture3(env, RbConfig.ruby, "-I", File.expand_path("../../lib", __dir__),
                                      File.expand_path("../../exe/microsandbox", __dir__), *args)
    [out, err, status.exitstatus]
  end

  it "boots, times and removes a sandbox" do
    before = Microsandbox::Sandbox.list.map(&:name)
    report = Microsandbox.doctor(boot: true)
    expect(report.ok?).to be(true)
    expect(report["boot"].status).to eq(:ok)
    expect(report["boot"].summary).to match(/\Aa sandbox booted and ran a command in \d+\.\d s \(#{report.accel}, kernel \S+\)\z/)
    expect(Microsandbox::Sandbox.list.map(&:name)).to eq(before)
  end

  it "exits 1 and says why when a sandbox cannot boot (a QEMU that only answers --version)" do
    Dir.mktmpdir("msb-fake-qemu") do |dir|
      fake = File.join(dir, "qemu-system-x86_64")
      File.write(fake, "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'QEMU emulator version 7.2.0'; exit 0; }\n" \
                       "echo 'fake qemu: cannot run guests' >&2; exit 1\n")
      File.chmod(0o755, fake)
      before = Microsandbox::Sandbox.list.map(&:name)
      out, err, status = doctor_cli("--json", "doctor", "--boot", env: { "MICROSANDBOX_QEMU" => fake })
      expect([err, status]).to eq(["", 1])
      doc = JSON.parse(out)
      expect(doc["ok"]).to be(false)
      qemu = doc["checks"].find { |c| c["name"] == "qemu" }
      boot = doc["checks"].find { |c| c["name"] == "boot" }
      expect(qemu).to include("status" => "ok", "summary" => "#{fake} 7.2.0")
      expect(boot["status"]).to eq("error")
      expect(boot["summary"]).to start_with("a test sandbox failed: boot-failed: ")
      expect(Microsandbox::Sandbox.list.map(&:name)).to eq(before)
    end
  end
end
