# frozen_string_literal: true

require "rbconfig"
require_relative "../support/registry"

# Microsandbox::Pool: ready sandboxes handed out at once, refilled in the background,
# safe under threads and fork, gone with their owner.
RSpec.describe Microsandbox::Pool do
  before(:all) do
    @ref = MicrosandboxSpec::Registry.instance.push_dir("team/pool", "1.0", MicrosandboxSpec::Rootfs.busybox_dir,
                                                         env: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
  end

  let(:opts) { { image: @ref, registry_insecure: true, memory: 256 } }

  def wait_ready(pool, count, timeout: 120)
    expect(wait_until(timeout: timeout, interval: 0.1) { pool.ready_count >= count }).to be(true)
  end

  it "hands out running sandboxes at once, uses each once, refills, and cleans up on shutdown" do
    prefix = unique_name("pool")
    names = []
    Microsandbox::Pool.open(size: 2, name_prefix: prefix, **opts) do |pool|
      wait_ready(pool, 2)
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      out = pool.checkout do |sb|
        names << sb.name
        expect(sb).to be_running
        # Warmed up (warm_up: true), with nothing of it the user could see: no output in
        # the log, the first command is session 1, no process left.
        supervisor_log = File.read(File.join(Microsandbox.home, "sandboxes", sb.name, "supervisor.log"))
        expect(supervisor_log).to match(/warm-up done in \d+ ms \(exit Some\(0\)\)/)
        expect(sb.logs(sources: %w[stdout stderr])).to be_empty
        hi = sb.shell("echo hi").stdout
        # The supervisor's log thread writes the entry after the output was forwarded: wait.
        stdout_log = -> { sb.logs(sources: %w[stdout]).map { |e| [e.session_id, e.text] } }
        wait_until(timeout: 10) { stdout_log.call.any? }
        expect(stdout_log.call).to eq([[1, "hi\n"]])
        expect(sb.exec("ps", ["-o", "comm"]).stdout.lines.map(&:strip)).not_to include("true")
        hi
      end
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 2.0
      expect(out).to eq("hi\n")
      expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(names.first) # stopped and removed
      wait_ready(pool, 2) # refilled
      pool.checkout { |sb| names << sb.name }
      expect(names.uniq.size).to eq(2)
      expect(pool.ready_count).to be <= 2
    end
    expect(wait_until(timeout: 30) { Microsandbox::Sandbox.list.none? { |s| s.name.start_with?(prefix) } }).to be(true)
    expect(processes_mentioning("sandboxes/#{prefix}")).to be_empty
  end

  it "serves concurrent threads, each its own sandbox" do
    Microsandbox::Pool.open(size: 2, **opts) do |pool|
      results = Array.new(3) do |i|
        Thread.new { pool.checkout(timeout: 300) { |sb| [sb.name, sb.shell("echo #{i}").stdout] } }
      end.map(&:value)
      expect(results.map(&:first).uniq.size).to eq(3)
      expect(results.map(&:last)).to eq(["0\n", "1\n", "2\n"])
    end
  end

  it "raises PoolTimeoutError when nothing is ready in time and PoolClosedError after shutdown" do
    pool = Microsandbox::Pool.new(size: 1, **opts.merge(image: "127.0.0.1:1/none/such:1"))
    expect { pool.checkout(timeout: 0.5) { nil } }.to raise_error(Microsandbox::PoolTimeoutError) { |e| expect(e.code).to eq("pool-timeout") }
    pool.shutdown
    expect { pool.checkout { nil } }.to raise_error(Microsandbox::PoolClosedError)
    expect { Microsandbox::Pool.new(size: 0, **opts) }.to raise_error(ArgumentError, /size/)
    expect { Microsandbox::Pool.new(size: 1, detached: true, **opts) }.to raise_error(ArgumentError, /detached/)
  end

  it "gives a forked child a pool of its own and leaves the parent's alone" do
    Microsandbox::Pool.open(size: 1, **opts) do |pool|
      wait_ready(pool, 1)
      reader, writer = IO.pipe
      pid = fork do
        reader.close
        name = pool.checkout(timeout: 300) { |sb| "#{sb.name} #{sb.shell('echo child').stdout.strip}" }
        writer.puts(name)
        writer.close
        exit!(0)
      end
      writer.close
      child_line = reader.read
      Process.wait(pid)
      expect($?.exitstatus).to eq(0)
      expect(child_line).to match(/\Apool-\h+ child\n\z/)
      expect(pool.ready_count).to eq(1)
      parent_name = pool.checkout { |sb| sb.shell("echo parent").stdout.strip && sb.name }
      expect(child_line).not_to include(parent_name)
    end
  end

  it "leaves no VM, record or disk behind when its owner is killed with SIGKILL" do
    prefix = unique_name("pool-kill")
    script = <<~RUBY
      $LOAD_PATH.unshift(#{File.expand_path('../../lib', __dir__).inspect})
      require "microsandbox"
      pool = Microsandbox::Pool.new(size: 2, name_prefix: #{prefix.inspect}, image: #{@ref.inspect}, registry_insecure: true, memory: 256)
      sleep 0.1 until pool.ready_count == 2
      puts "ready"
      $stdout.flush
      sleep
    RUBY
    io = IO.popen([RbConfig.ruby, "-e", script], err: File::NULL)
    Timeout.timeout(300) { expect(io.gets).to eq("ready\n") }
    expect(processes_mentioning("sandboxes/#{prefix}")).not_to be_empty
    Process.kill(:KILL, io.pid)
    Process.wait(io.pid)
    expect(wait_until(timeout: 30) { processes_mentioning("sandboxes/#{prefix}").empty? }).to be(true)
    # Pool sandboxes are ephemeral: no record and no directory is left either.
    expect(wait_until(timeout: 30) { Microsandbox::Sandbox.list.none? { |s| s.name.start_with?(prefix) } }).to be(true)
    expect(Dir.glob(File.join(Microsandbox.home, "sandboxes", "#{prefix}-*"))).to eq([])
  ensure
    io&.close
  end
end
