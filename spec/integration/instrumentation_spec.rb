# frozen_string_literal: true

require "active_support"
require "active_support/notifications"
require_relative "../support/registry"

# `*.microsandbox` events through Debian's ruby-activesupport, from real calls: names,
# payloads (redacted: no env values, arguments, stdin or credentials), results, errors.
RSpec.describe "ActiveSupport::Notifications events" do
  let(:secret) { "s3cr3t-#{SecureRandom.hex(6)}" }

  around do |example|
    @events = []
    subscriber = ActiveSupport::Notifications.subscribe(/\.microsandbox\z/) do |*args|
      @events << ActiveSupport::Notifications::Event.new(*args)
    end
    example.run
  ensure
    ActiveSupport::Notifications.unsubscribe(subscriber)
  end

  def event(name) = @events.find { |e| e.name == name }

  it "publishes create, exec, exec_stream, stop, start, kill and remove with redacted payloads" do
    expect(Microsandbox.instrumenter).to eq(ActiveSupport::Notifications)
    name = unique_name("notify")
    sb = Microsandbox::Sandbox.create(name, image: rootfs, env: { "TOKEN" => secret }, network: "none", memory: 256)
    out = sb.exec("sh", ["-c", "echo \"$0\"; exit 3", secret], stdin: secret, timeout: 30)
    expect(out.exit_code).to eq(3)
    sb.exec_stream("echo", [secret]).collect
    expect { sb.exec("no-such-program") }.to raise_error(Microsandbox::ExecFailedError)
    sb.stop
    Microsandbox::Sandbox.start(name, detached: true).kill
    Microsandbox::Sandbox.remove(name)

    expect(@events.map(&:name)).to eq(%w[create exec exec_stream exec stop start kill remove].map { |n| "#{n}.microsandbox" })
    expect(event("create.microsandbox").payload).to include(name: name, image: rootfs, cpus: 1, memory_mib: 256,
                                                            network: "none", detached: false, accel: sb.info[:accel])
    expect(event("create.microsandbox").payload[:boot_ms]).to be_a(Integer)
    expect(event("create.microsandbox").duration).to be > 0
    expect(event("exec.microsandbox").payload).to eq(sandbox: name, cmd: "sh", args_count: 3, tty: false, timeout: 30.0,
                                                     exit_code: 3)
    expect(event("exec_stream.microsandbox").payload).to eq(sandbox: name, cmd: "echo", args_count: 1, tty: false, timeout: nil)
    failed = @events.select { |e| e.name == "exec.microsandbox" }.last
    expect(failed.payload[:exception]).to eq(["Microsandbox::ExecFailedError", failed.payload[:exception_object].message])
    expect(event("stop.microsandbox").payload).to eq(name: name, timeout: 10)
    expect(event("start.microsandbox").payload).to eq(name: name, detached: true)
    expect([event("kill.microsandbox").payload, event("remove.microsandbox").payload]).to eq([{ name: name }, { name: name }])
    @events.each { |e| expect(e.payload.inspect).not_to include(secret) }
  end

  it "publishes pull with the reference and the resulting digest, never the credentials" do
    registry = MicrosandboxSpec::Registry.instance
    ref = registry.push_dir("notify/busybox", "1.0", MicrosandboxSpec::Rootfs.busybox_dir)
    result = Microsandbox::Image.pull(ref, pull_policy: :always, registry_insecure: true,
                                           registry_auth: { username: "user", password: secret })
    pull = event("pull.microsandbox")
    expect(pull.payload).to eq(reference: ref, pull_policy: "always", manifest_digest: result[:manifest_digest])
    expect(pull.payload.inspect).not_to include(secret)
    Microsandbox::Image.remove(ref)
  end
end

RSpec.describe "examples/active_job" do
  it "runs a job in a throwaway sandbox: result to the callback, events, nothing left behind" do
    ENV["SANDBOX_IMAGE"] = rootfs
    require_relative "../../examples/active_job/sandbox_run_job"
    ActiveJob::Base.logger = Logger.new(nil)
    events = []
    subscriber = ActiveSupport::Notifications.subscribe(/\.microsandbox\z/) { |name, *, payload| events << [name, payload] }
    results = []
    SandboxRunJob.on_result = ->(id, result) { results << [id, result] }
    job = SandboxRunJob.new("printf hi; printf oops >&2; exit 2", timeout: 20)
    expect(job.perform_now).to eq(status: :done, exit_code: 2, stdout: "hi", stderr: "oops")
    expect(results).to eq([[job.job_id, { status: :done, exit_code: 2, stdout: "hi", stderr: "oops" }]])
    name = "aj-#{job.job_id}"
    expect(events.map(&:first)).to eq(%w[create.microsandbox exec.microsandbox kill.microsandbox remove.microsandbox])
    expect(events.map { |_, p| p[:name] || p[:sandbox] }.uniq).to eq([name])
    expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
  ensure
    ActiveSupport::Notifications.unsubscribe(subscriber) if subscriber
    ENV.delete("SANDBOX_IMAGE")
  end
end
