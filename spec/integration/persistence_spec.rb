# frozen_string_literal: true

require "rbconfig"

RSpec.describe "named, persistent sandboxes" do
  let(:lib) { File.expand_path("../../lib", __dir__) }

  def run_ruby(script)
    IO.popen([RbConfig.ruby, "-I#{lib}", "-e", script], err: File::NULL, &:read)
  end

  it "keeps a stopped sandbox's root disk and starts it again" do
    name = unique_name("persist")
    Microsandbox::Sandbox.create(name, image: rootfs, labels: { "team" => "qa" }, env: { "K" => "v" }) do |sb|
      sb.shell("echo kept > /root/state && sync")
    end
    info = Microsandbox::Sandbox.list.find { |i| i.name == name }
    expect(info.status).to eq(:stopped)
    expect(info.labels).to eq("team" => "qa")
    expect(info.config).not_to have_key("env")

    expect { Microsandbox::Sandbox.create(name, image: rootfs) }
      .to raise_error(Microsandbox::SandboxAlreadyExistsError, /Sandbox.start/)

    Microsandbox::Sandbox.start(name) do |sb|
      expect(sb.exec("cat", ["/root/state"]).stdout).to eq("kept\n")
      expect(sb.shell("echo $K").stdout).to eq("v\n")
      expect { Microsandbox::Sandbox.start(name) }.to raise_error(Microsandbox::SandboxStillRunningError)
      expect { Microsandbox::Sandbox.remove(name) }.to raise_error(Microsandbox::SandboxStillRunningError)
    end
    Microsandbox::Sandbox.remove(name)
    expect { Microsandbox::Sandbox.get(name) }.to raise_error(Microsandbox::SandboxNotFoundError)
    expect(File.exist?(sandbox_dir(name))).to be(false)
  end

  it "raises SandboxNotFoundError for unknown names" do
    expect { Microsandbox::Sandbox.start("never-made") }.to raise_error(Microsandbox::SandboxNotFoundError) { |e|
      expect(e.code).to eq("sandbox-not-found")
    }
    expect { Microsandbox::Sandbox.remove("never-made") }.to raise_error(Microsandbox::SandboxNotFoundError)
  end

  it "filters by labels and replaces by name" do
    name = unique_name("labels")
    Microsandbox::Sandbox.create(name, image: rootfs, labels: { "role" => "old" }) do |sb|
      expect(Microsandbox::Sandbox.list_with(labels: { "role" => "old" }).map(&:name)).to include(name)
      expect(Microsandbox::Sandbox.list_with(labels: { "role" => "new" }).map(&:name)).not_to include(name)
      old_vmm = sb.info[:vmm_pid]
      Microsandbox::Sandbox.create(name, image: rootfs, labels: { "role" => "new" }, replace: true) do |fresh|
        expect(pid_alive?(old_vmm)).to be(false)
        expect(fresh.labels).to eq("role" => "new")
        expect(fresh.exec("true").success?).to be(true)
      end
    end
  end

  it "runs a detached sandbox that outlives its creator and is controlled from another process" do
    name = unique_name("detached")
    out = run_ruby(<<~RUBY)
      require "microsandbox"
      sb = Microsandbox::Sandbox.create(#{name.inspect}, image: #{rootfs.inspect}, detached: true)
      sb.shell("echo from-creator > /tmp/mark")
      puts sb.owns_lifecycle?
    RUBY
    expect(out.strip).to eq("false")
    sb = Microsandbox::Sandbox.get(name)
    expect(sb.status).to eq(:running)
    expect(sb.owns_lifecycle?).to be(false)
    expect(sb.exec("cat", ["/tmp/mark"]).stdout).to eq("from-creator\n")
    vmm = sb.info[:vmm_pid]
    sb.stop
    expect(wait_until(timeout: 10) { !pid_alive?(vmm) }).to be(true)
    expect(Microsandbox::Sandbox.get(name).status).to eq(:stopped)
  end

  it "detaches an owned sandbox so it survives its owner" do
    name = unique_name("detach")
    out = run_ruby(<<~RUBY)
      require "microsandbox"
      sb = Microsandbox::Sandbox.create(#{name.inspect}, image: #{rootfs.inspect})
      before = sb.owns_lifecycle?
      sb.detach
      puts [before, sb.owns_lifecycle?].join(" ")
    RUBY
    expect(out.strip).to eq("true false")
    sb = Microsandbox::Sandbox.get(name)
    expect(sb.running?).to be(true)
    expect(sb.exec("echo", ["alive"]).stdout).to eq("alive\n")
    sb.kill
    expect(Microsandbox::Sandbox.get(name).status).to eq(:stopped)
  end

  # Children of this process in state `state` (nil: any), from /proc/<pid>/stat.
  def children_of_self(state = nil)
    Dir["/proc/[0-9]*/stat"].filter_map do |f|
      fields = File.read(f).split(") ").last.split
      f.split("/")[2].to_i if fields[1].to_i == Process.pid && (state.nil? || fields[0] == state)
    rescue Errno::ENOENT, Errno::ESRCH
      nil
    end
  end

  it "reaps the supervisors of sandboxes it detached, without stopping them" do
    names = [unique_name("reap-det"), unique_name("reap-own")]
    detached = Microsandbox::Sandbox.create(names[0], image: rootfs, detached: true)
    owned = Microsandbox::Sandbox.create(names[1], image: rootfs)
    owned.detach
    supervisors = [detached, owned].map { |sb| sb.info[:supervisor_pid] }
    expect(children_of_self).to include(*supervisors)
    detached = owned = nil
    GC.start # dropping the handles must not stop the sandboxes
    names.each { |n| expect(Microsandbox::Sandbox.get(n).exec("true").success?).to be(true) }

    names.each { |n| Microsandbox::Sandbox.get(n).stop }
    expect(supervisors).to all(satisfy { |p| !pid_alive?(p) })
    expect(wait_until(timeout: 5) { (children_of_self("Z") & supervisors).empty? }).to be(true)
    expect(children_of_self & supervisors).to be_empty
  end
end

RSpec.describe "sandboxes that stop by themselves" do
  it "stops after max_duration" do
    name = unique_name("maxdur")
    sb = Microsandbox::Sandbox.create(name, image: rootfs, max_duration: 3)
    vmm = sb.info[:vmm_pid]
    expect(wait_until(timeout: 30) { !pid_alive?(vmm) }).to be(true)
    expect(wait_until(timeout: 5) { Microsandbox::Sandbox.get(name).status == :stopped }).to be(true)
    expect { sb.exec("true") }.to raise_error(Microsandbox::SandboxNotRunningError)
  end

  it "stops after idle_timeout, but not while a command runs" do
    name = unique_name("idle")
    sb = Microsandbox::Sandbox.create(name, image: rootfs, idle_timeout: 2)
    expect(sb.exec("sleep", ["4"]).success?).to be(true) # longer than the idle timeout
    vmm = sb.info[:vmm_pid]
    expect(pid_alive?(vmm)).to be(true)
    expect(wait_until(timeout: 30) { !pid_alive?(vmm) }).to be(true)
    expect(wait_until(timeout: 5) { Microsandbox::Sandbox.get(name).status == :stopped }).to be(true)
  end

  it "rejects non-positive durations" do
    expect { Microsandbox::Sandbox.create(unique_name, image: rootfs, idle_timeout: 0) }
      .to raise_error(Microsandbox::InvalidConfigError)
  end
end

RSpec.describe "asynchronous stop controls" do
  it "request_stop returns at once; wait_until_stopped reports the stop" do
    name = unique_name("reqstop")
    sb = Microsandbox::Sandbox.create(name, image: rootfs)
    not_yet = sb.wait_until_stopped(timeout: 0.2)
    expect(not_yet.stopped?).to be(false)
    other = Microsandbox::Sandbox.get(name) # any handle can ask
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    other.request_stop(timeout: 10)
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0).to be < 1
    result = sb.wait_until_stopped(timeout: 30)
    expect(result.stopped?).to be(true)
    expect(result.name).to eq(name)
    expect(Microsandbox::Sandbox.get(name).status).to eq(:stopped)
  end

  # Starts `sleep 2` in `sb` and returns a thread collecting its events, once it runs.
  def running_session(sb)
    started = Queue.new
    reader = Thread.new do
      sb.exec_stream("sh", ["-c", "echo started; sleep 2; echo finished"]).each_with_object([]) do |ev, all|
        started << true if ev.stdout? && all.none?(&:stdout?)
        all << ev
      end
    ensure
      started << true # a failure surfaces from reader.value
    end
    started.pop
    reader
  end

  it "request_drain lets running commands finish, refuses new ones, then stops" do
    name = unique_name("drain")
    sb = Microsandbox::Sandbox.create(name, image: rootfs)
    reader = running_session(sb)
    Microsandbox::Sandbox.get(name).request_drain
    expect { sb.exec("true") }.to raise_error(Microsandbox::SandboxDrainingError) { |e|
      expect(e.code).to eq("sandbox-draining")
      expect(e).to be_a(Microsandbox::SandboxNotRunningError)
    }
    expect { sb.fs.read("/etc/passwd") }.to raise_error(Microsandbox::SandboxDrainingError, /draining/)
    events = reader.value
    expect(events.select(&:stdout?).map(&:text).join).to eq("started\nfinished\n")
    expect(events.last.exit_code).to eq(0)
    result = sb.wait_until_stopped(timeout: 30)
    expect(result.stopped?).to be(true)
    expect(Microsandbox::Sandbox.get(name).status).to eq(:stopped)
  end

  it "request_drain from another process drains a detached sandbox" do
    name = unique_name("drain-det")
    sb = Microsandbox::Sandbox.create(name, image: rootfs, detached: true)
    reader = running_session(sb)
    lib = File.expand_path("../../lib", __dir__)
    out = IO.popen([RbConfig.ruby, "-I#{lib}", "-e", <<~RUBY], err: File::NULL, &:read)
      require "microsandbox"
      sb = Microsandbox::Sandbox.get(#{name.inspect})
      sb.request_drain(timeout: 60)
      begin
        sb.exec("true")
      rescue Microsandbox::Error => e
        puts e.code
      end
    RUBY
    expect(out.strip).to eq("sandbox-draining")
    expect(reader.value.last.exit_code).to eq(0)
    expect(sb.wait_until_stopped(timeout: 30).stopped?).to be(true)
    expect(Microsandbox::Sandbox.get(name).status).to eq(:stopped)
  end

  it "request_kill kills at once" do
    sb = Microsandbox::Sandbox.create(unique_name("reqkill"), image: rootfs)
    vmm = sb.info[:vmm_pid]
    sb.request_kill
    expect(sb.wait_until_stopped(timeout: 10).stopped?).to be(true)
    expect(pid_alive?(vmm)).to be(false)
    expect { sb.exec("true") }.to raise_error(Microsandbox::SandboxNotRunningError)
  end
end
