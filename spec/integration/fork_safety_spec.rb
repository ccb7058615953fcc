# frozen_string_literal: true

require "json"
require "open3"
require "rbconfig"
require_relative "../support/registry"

# Servers (Puma, Unicorn, Resque, Sidekiq swarm) fork after the gem is in use. Whatever a
# forked child does with what it inherited, the parent's VM, streams and sockets go on.
RSpec.describe "fork safety" do
  before(:all) do
    @ref = MicrosandboxSpec::Registry.instance.push_dir("fork/busybox", "1", MicrosandboxSpec::Rootfs.busybox_dir)
    @sb = Microsandbox::Sandbox.create(unique_name("forkp"), image: rootfs)
    @payload = Random.new(8).bytes(300 * 1024)
    @sb.fs.write("/tmp/payload", @payload)
  end

  after(:all) { @sb&.kill }

  let(:sb) { @sb }

  # One of every kind of object the gem hands out, each mid-use.
  def open_everything
    stream = sb.exec_stream("cat", stdin: :pipe)
    stream.stdin.write("before\n")
    reader = sb.fs.read_stream("/tmp/payload")
    head = reader.read_chunk
    writer = sb.fs.write_stream("/tmp/upload")
    writer.write("one,")
    pull = Microsandbox::Image.start_pull(@ref, pull_policy: :always, registry_insecure: true)
    { stream: stream, reader: reader, head: head, writer: writer, pull: pull }
  end

  # Forks, runs the block in the child (stderr silenced), returns [status, child's report].
  def in_child(&block)
    rd, wr = IO.pipe
    pid = fork do
      rd.close
      $stderr.reopen(File::NULL)
      block.call(wr)
    end
    wr.close
    status = Timeout.timeout(120) { Process.wait2(pid).last }
    report = rd.read
    rd.close
    [status, report.empty? ? nil : JSON.parse(report)]
  end

  def expect_parent_untouched(objs)
    expect(pid_alive?(sb.info[:vmm_pid])).to be(true)
    expect(pid_alive?(sb.info[:supervisor_pid])).to be(true)
    expect(sb.running?).to be(true)
    expect(sb.exec("echo", ["after"]).stdout).to eq("after\n")
    objs[:stream].stdin.write("after\n")
    objs[:stream].stdin.close
    out = objs[:stream].collect
    expect([out.stdout, out.exit_code]).to eq(["before\nafter\n", 0])
    rest = +"".b
    while (chunk = objs[:reader].read_chunk)
      rest << chunk
    end
    expect(objs[:head] + rest).to eq(@payload)
    objs[:writer].write("two")
    expect(objs[:writer].finish).to eq(7)
    expect(sb.fs.read("/tmp/upload")).to eq("one,two")
    expect(objs[:pull].wait[:manifest_digest]).to start_with("sha256:")
  end

  it "survives a child that exits normally (at_exit teardown frees every inherited object)" do
    objs = open_everything
    status, = in_child { |_| nil }
    expect(status.success?).to be(true)
    sleep 1
    expect_parent_untouched(objs)
  end

  it "survives a child whose at_exit handlers stop, kill and close everything it inherited" do
    objs = open_everything
    status, = in_child do |_|
      at_exit do
        sb.stop
        sb.kill
        sb.request_kill
        sb.request_stop
        objs[:stream].close
        objs[:reader].close
        objs[:writer].abort
      end
      exit 3
    end
    expect(status.exitstatus).to eq(3)
    expect_parent_untouched(objs)
  end

  it "survives a child that drops everything, runs GC and finalizers, then raises" do
    objs = open_everything
    held = [objs.dup]
    status, = in_child do |_|
      ObjectSpace.define_finalizer(Object.new, proc { sb.kill })
      held.clear
      objs.clear
      3.times { GC.start(full_mark: true, immediate_sweep: true) }
      raise "the child fails"
    end
    expect(status.success?).to be(false)
    expect_parent_untouched(held.first)
  end

  it "survives a child that execs another program" do
    objs = open_everything
    status, = in_child { |_| exec("/bin/sh", "-c", "exit 4") }
    expect(status.exitstatus).to eq(4)
    expect_parent_untouched(objs)
  end

  it "lets a child run commands in the inherited sandbox, and refuses it the parent's streams" do
    objs = open_everything
    status, report = in_child do |w|
      result = { "exec" => sb.exec("echo", ["from the child"]).stdout, "owns" => sb.owns_lifecycle? }
      probes = {
        "stream" => -> { objs[:stream].each { |_| nil } },
        "stdin" => -> { objs[:stream].stdin.write("x") },
        "signal" => -> { objs[:stream].signal(15) },
        "reader" => -> { objs[:reader].read_chunk },
        "writer" => -> { objs[:writer].write("x") },
        "finish" => -> { objs[:writer].finish },
        "pull" => -> { objs[:pull].wait }
      }
      probes.each do |name, probe|
        probe.call
        result[name] = "no error"
      rescue Microsandbox::Error => e
        result[name] = e.class.name
      end
      sb.stop
      sb.kill
      w.write(JSON.generate(result))
      exit!(0)
    end
    expect(status.success?).to be(true)
    expect(report).to include("exec" => "from the child\n", "owns" => false)
    %w[stream stdin signal reader writer finish pull].each do |k|
      expect(report[k]).to eq("Microsandbox::InheritedHandleError"), "#{k}: #{report[k]}"
    end
    expect_parent_untouched(objs)
  end

  it "cleans up a sandbox the child created itself, and only that one" do
    objs = open_everything
    name = unique_name("forkc")
    status, report = in_child do |w|
      own = Microsandbox::Sandbox.create(name, image: rootfs)
      own.exec("true")
      w.write(JSON.generate([own.info[:vmm_pid], own.info[:supervisor_pid]]))
      w.close
      # Exits normally without stopping it: the child owns it, so it goes with the child.
    end
    expect(status.success?).to be(true)
    vmm, supervisor = report
    expect(wait_until(timeout: 20) { !pid_alive?(vmm) && !pid_alive?(supervisor) }).to be(true)
    expect(Microsandbox::Sandbox.list.find { |i| i.name == name }.status).to eq(:stopped)
    Microsandbox::Sandbox.remove(name)
    expect_parent_untouched(objs)
  end

  it "still kills the VM when its owner is SIGKILLed while a forked child lives on" do
    lib = File.expand_path("../../lib", __dir__)
    script = <<~RUBY
      require "microsandbox"
      sb = Microsandbox::Sandbox.create(#{unique_name('forko').inspect}, image: #{rootfs.inspect})
      child = fork { sleep 120 }
      puts [sb.info[:vmm_pid], sb.info[:supervisor_pid], child].join(" ")
      $stdout.flush
      sleep
    RUBY
    Open3.popen2(RbConfig.ruby, "-I#{lib}", "-e", script) do |_in, out, wait|
      line = Timeout.timeout(120) { out.gets }
      vmm, supervisor, child = line.split.map(&:to_i)
      begin
        Process.kill(:KILL, wait.pid)
        wait.value
        expect(pid_alive?(child)).to be(true)
        expect(wait_until(timeout: 15) { !pid_alive?(vmm) && !pid_alive?(supervisor) }).to be(true)
      ensure
        Process.kill(:KILL, child) if pid_alive?(child)
      end
    end
  end
end
