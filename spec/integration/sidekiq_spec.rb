# frozen_string_literal: true

require "json"
require "securerandom"
require "socket"
require "tmpdir"
require "sidekiq"
require "sidekiq/api"

# examples/sidekiq with everything real: a redis-server on a loopback port in a temp
# directory, two Sidekiq worker processes, sandboxes booted per job.
RSpec.describe "examples/sidekiq" do
  def self.redis_server = "/usr/bin/redis-server"
  let(:labels) { { "app" => "sidekiq-example" } }

  before(:all) do
    raise "#{self.class.redis_server} is missing: apt-get install redis-server (bin/setup does)" unless File.executable?(self.class.redis_server)

    @dir = Dir.mktmpdir("msb-sidekiq")
    @port = TCPServer.open("127.0.0.1", 0) { |s| s.addr[1] }
    @redis_pid = Process.spawn(self.class.redis_server, "--bind", "127.0.0.1", "--port", @port.to_s, "--dir", @dir,
                               "--save", "", "--appendonly", "no", out: File.join(@dir, "redis.log"), err: :out)
    @url = "redis://127.0.0.1:#{@port}/0"
    Redis.silence_deprecations = true if Redis.respond_to?(:silence_deprecations=) # Debian's sidekiq 6.4 on redis-rb 4.8
    Sidekiq.configure_client { |c| c.redis = { url: @url } }
    Timeout.timeout(30) do
      loop do
        break if (Sidekiq.redis(&:ping) rescue nil) == "PONG" # rubocop:disable Style/RescueModifier

        sleep 0.1
      end
    end
    @workers = []
  end

  after(:all) do
    @workers.each { |pid| stop_worker(pid) }
    if @redis_pid
      Process.kill(:TERM, @redis_pid)
      Process.wait(@redis_pid)
    end
    FileUtils.rm_rf(@dir)
  end

  def start_worker(tag)
    log = File.join(@dir, "sidekiq-#{tag}.log")
    env = { "REDIS_URL" => @url, "SANDBOX_IMAGE" => rootfs }
    pid = Process.spawn(env, RbConfig.ruby, "-I", File.expand_path("../../lib", __dir__), Gem.bin_path("sidekiq", "sidekiq"),
                        "-r", File.expand_path("../../examples/sidekiq/boot.rb", __dir__), "-c", "2", "-t", "5",
                        out: log, err: :out)
    @workers << pid
    pid
  end

  def stop_worker(pid, signal = :TERM)
    Process.kill(signal, pid)
    Timeout.timeout(60) { Process.wait(pid) }
  rescue Errno::ESRCH, Errno::ECHILD
    nil
  ensure
    @workers.delete(pid)
  end

  def result(id)
    raw = Sidekiq.redis { |r| r.get("sandbox-result:#{id}") }
    raw && JSON.parse(raw)
  end

  def wait_for_workers(count)
    ok = wait_until(timeout: 120, interval: 0.5) { Sidekiq::ProcessSet.new.count { |p| @workers.include?(p["pid"]) } == count }
    expect(ok).to be(true), "#{count} Sidekiq workers did not start: #{Dir[File.join(@dir, '*.log')].map { |f| File.read(f) }.join}"
  end

  def example_sandboxes
    Microsandbox::Sandbox.list_with(labels: labels)
  end

  it "runs 20 jobs on two worker processes, each in its own sandbox, and leaves none behind" do
    2.times { |i| start_worker("a#{i}") }
    wait_for_workers(2)

    jobs = 20.times.map do |i|
      id = SecureRandom.hex(8)
      script = i == 19 ? "echo slow; sleep 60" : "printf 'job %s\\n' #{i}; echo err-#{i} >&2; exit #{i % 3}"
      Sidekiq::Client.push("class" => "SandboxJob", "args" => [id, script, i == 19 ? 2 : 30])
      [i, id]
    end
    done = wait_until(timeout: 900, interval: 1) { jobs.all? { |_, id| %w[done timeout].include?(result(id)&.fetch("state")) } }
    expect(done).to be(true), "unfinished: #{jobs.reject { |_, id| %w[done timeout].include?(result(id)&.fetch('state')) }.inspect}"

    jobs.each do |i, id|
      r = result(id)
      if i == 19
        expect(r).to include("state" => "timeout", "timeout" => 2)
      else
        expect(r).to include("state" => "done", "exit_code" => i % 3, "stdout" => "job #{i}\n", "stderr" => "err-#{i}\n")
      end
    end
    pids = jobs.map { |_, id| result(id)["worker_pid"] }.uniq
    expect(pids.sort).to eq(@workers.sort) # both processes took jobs
    names = jobs.map { |_, id| result(id)["sandbox"] }
    expect(names.uniq.size).to eq(20)
    expect(wait_until(timeout: 30) { example_sandboxes.empty? }).to be(true), example_sandboxes.inspect
    names.each { |n| expect(processes_mentioning(sandbox_dir(n))).to be_empty }
  end

  it "kill -9 of a worker leaves no VM; the next worker to start sweeps its record" do
    victim = @workers.first || start_worker("victim")
    start_worker("b") if @workers.size < 2
    wait_for_workers(2)
    # Only the victim may take the long job: pause the other by sending it TSTP (quiet).
    (@workers - [victim]).each { |pid| Process.kill(:TSTP, pid) }
    sleep 3
    id = SecureRandom.hex(8)
    Sidekiq::Client.push("class" => "SandboxJob", "args" => [id, "sleep 600", 900])
    running = wait_until(timeout: 300, interval: 0.5) do
      r = result(id)
      r && example_sandboxes.any? { |h| h.name == r["sandbox"] && h.running? }
    end
    expect(running).to be(true)
    name = result(id)["sandbox"]
    expect(result(id)["worker_pid"]).to eq(victim)
    expect(processes_mentioning(sandbox_dir(name))).not_to be_empty

    stop_worker(victim, :KILL)
    expect(wait_until(timeout: 30) { processes_mentioning(sandbox_dir(name)).empty? }).to be(true)
    expect(example_sandboxes.map(&:name)).to eq([name]) # the record stays, stopped
    expect(Microsandbox::Sandbox.get(name).stopped?).to be(true)

    start_worker("sweeper")
    expect(wait_until(timeout: 120) { example_sandboxes.empty? }).to be(true)
  end

  it "TERM during a job: Sidekiq's shutdown stops and removes its sandbox and requeues the job" do
    @workers.dup.each { |pid| stop_worker(pid) }
    worker = start_worker("term")
    wait_for_workers(1)
    id = SecureRandom.hex(8)
    Sidekiq::Client.push("class" => "SandboxJob", "args" => [id, "sleep 600", 900])
    expect(wait_until(timeout: 300, interval: 0.5) { example_sandboxes.any?(&:running?) }).to be(true)
    name = result(id)["sandbox"]

    stop_worker(worker) # -t 5: Sidekiq raises Shutdown in the job after 5 s
    expect(example_sandboxes).to be_empty
    expect(processes_mentioning(sandbox_dir(name))).to be_empty
    expect(Sidekiq::Queue.new("default").size).to eq(1) # pushed back, to run again
    Sidekiq::Queue.new("default").clear
  end
end
