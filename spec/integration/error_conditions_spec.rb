# frozen_string_literal: true

require "fileutils"

# The error classes whose conditions are rare, each provoked for real.
# (MetricsUnavailableError: see the metrics module's Rust tests, which need a procfs that
# cannot be read; MetricsDisabledError is never raised — see its documentation.)
RSpec.describe "rarely raised errors" do
  it "raises HostIOError when the home directory cannot be created" do
    old = ENV.fetch("MICROSANDBOX_HOME", nil)
    ENV["MICROSANDBOX_HOME"] = "/dev/null/microsandbox-home"
    expect { Microsandbox::Sandbox.list }.to raise_error(Microsandbox::HostIOError, %r{/dev/null/microsandbox-home}) { |e|
      expect(e.code).to eq("io-error")
    }
  ensure
    ENV["MICROSANDBOX_HOME"] = old
  end

  it "raises ProtocolError when the supervisor speaks garbage, and leaves nothing behind" do
    Dir.mktmpdir do |dir|
      fake = File.join(dir, "fake-msb")
      File.write(fake, "#!/bin/sh\necho 'this is not a startup report'\nwhile :; do sleep 1; done\n")
      File.chmod(0o755, fake)
      name = unique_name("garbage")
      begin
        Microsandbox.runtime_path = fake
        expect { Microsandbox::Sandbox.create(name, image: rootfs) }
          .to raise_error(Microsandbox::ProtocolError, /unreadable supervisor report/) { |e|
            expect(e.code).to eq("protocol-error")
          }
      ensure
        Microsandbox.runtime_path = nil
      end
      expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
      expect(wait_until(timeout: 5) { processes_mentioning(fake).empty? }).to be(true)
    end
  end

  context "with a running sandbox" do
    before(:all) { @sb = Microsandbox::Sandbox.create(unique_name("cancel"), image: rootfs) }
    after(:all) { @sb&.kill }

    it "raises CancelledError when Thread#wakeup interrupts a blocked call, and stops its command" do
      t = Thread.new { @sb.exec("sleep", ["60"]) }
      t.report_on_exception = false
      expect(wait_until(timeout: 10) { @sb.exec("ps").stdout.include?("sleep 60") }).to be(true)
      t.wakeup
      expect { t.value }.to raise_error(Microsandbox::CancelledError, /interrupted/) { |e|
        expect(e.code).to eq("cancelled")
      }
      expect(wait_until(timeout: 5) { !@sb.exec("ps").stdout.include?("sleep 60") }).to be(true)
    end
  end
end
