# frozen_string_literal: true

# One VM serves all examples here: booting under TCG takes seconds.
RSpec.describe "Sandbox#exec in a real VM" do
  before(:all) do
    @sb = Microsandbox::Sandbox.create(unique_name("exec"), image: rootfs, hostname: "box.example",
                                                            env: { "BOX_VAR" => "from-box" }, workdir: "/tmp")
  end

  after(:all) { @sb&.kill }

  let(:sb) { @sb }

  it "boots its own kernel and reports the VMM and accelerator" do
    expect(sb.info[:vmm]).to eq("qemu")
    expect(%w[kvm hvf tcg]).to include(sb.info[:accel])
    expect(sb.exec("uname", ["-r"]).stdout.strip).to eq(sb.info[:kernel])
    expect(sb.exec("cat", ["/proc/1/comm"]).stdout).to eq("init\n")
    expect(sb.exec("hostname").stdout).to eq("box.example\n")
    expect(sb.inspect).to include("running", "accel=#{sb.info[:accel]}")
  end

  it "runs a command with args and returns stdout, stderr and the exit code" do
    out = sb.exec("sh", ["-c", "echo out; echo err >&2; exit 3"])
    expect(out.stdout).to eq("out\n")
    expect(out.stderr).to eq("err\n")
    expect(out.exit_code).to eq(3)
    expect(out.success?).to be(false)
  end

  it "passes arguments verbatim, without a shell" do
    out = sb.exec("printf", ["%s|", "a b", "$HOME", "*", ""])
    expect(out.stdout).to eq("a b|$HOME|*||")
  end

  it "merges sandbox and call environment, call winning" do
    out = sb.shell("echo $BOX_VAR $CALL_VAR", env: { "CALL_VAR" => "from-call" })
    expect(out.stdout).to eq("from-box from-call\n")
    out = sb.shell("echo $BOX_VAR", env: { "BOX_VAR" => "override" })
    expect(out.stdout).to eq("override\n")
  end

  it "uses the sandbox workdir by default and cwd: when given" do
    expect(sb.exec("pwd").stdout).to eq("/tmp\n")
    expect(sb.exec("pwd", cwd: "/etc").stdout).to eq("/etc\n")
  end

  it "feeds stdin and returns binary output byte-exact" do
    data = (0..255).map(&:chr).join.b * 64
    out = sb.exec("cat", stdin: data)
    expect(out.stdout_bytes).to eq(data)
    expect(out.stdout_bytes.encoding).to eq(Encoding::BINARY)
  end

  it "runs shell scripts with pipes" do
    expect(sb.shell("echo hello world | wc -w").stdout.strip).to eq("2")
  end

  it "raises ExecFailedError when the command does not exist" do
    expect { sb.exec("no-such-command") }.to raise_error(Microsandbox::ExecFailedError, /no-such-command/) { |e|
      expect(e.code).to eq("exec-failed")
    }
  end

  it "raises ExecTimeoutError past timeout: and stays usable" do
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    expect { sb.exec("sleep", ["30"], timeout: 1) }.to raise_error(Microsandbox::ExecTimeoutError)
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0).to be < 10
    expect(sb.exec("echo", ["still here"]).stdout).to eq("still here\n")
  end

  it "reports death by signal" do
    out = sb.shell("kill -9 $$")
    expect(out.signal).to eq(9)
    expect(out.exit_code).to eq(137)
  end

  it "coerces exec arguments with to_s as the reference gem does; rejects bad ones before running anything" do
    expect(sb.exec("echo", ["ok", 1, :sym]).stdout).to eq("ok 1 sym\n")
    expect(sb.exec(:echo, "one").stdout).to eq("one\n")
    expect(sb.exec("sh", ["-c", "echo $N"], env: { N: 7 }).stdout).to eq("7\n")
    expect { sb.exec("true", env: ["N=1"]) }.to raise_error(TypeError, /env must be a Hash/)
    expect { sb.exec("echo", ["a\0b"]) }.to raise_error(Microsandbox::InvalidConfigError, /NUL/)
    expect { sb.exec("pwd", cwd: "relative") }.to raise_error(Microsandbox::InvalidConfigError, /absolute/)
    expect { sb.exec("true", env: { "A=B" => "x" }) }.to raise_error(Microsandbox::InvalidConfigError)
    expect { sb.exec("true", env: { "HUGE" => "x" * (1 << 20) }) }.to raise_error(Microsandbox::InvalidConfigError, /limit/)
  end

  it "runs concurrent execs from several Ruby threads without mixing output" do
    threads = 6.times.map do |i|
      Thread.new { sb.shell("for n in 1 2 3; do echo t#{i}-$n; done; sleep 0.2").stdout }
    end
    threads.each_with_index do |t, i|
      expect(t.value).to eq("t#{i}-1\nt#{i}-2\nt#{i}-3\n")
    end
  end

  it "releases the GVL: another Ruby thread keeps running during a long exec" do
    ticks = 0
    ticker = Thread.new { loop { ticks += 1; sleep 0.01 } }
    sb.exec("sleep", ["2"])
    ticker.kill
    # 2 s at 10 ms per tick is ~200 ticks with the GVL free; a held GVL allows one or two
    # (before and after). A loaded host stretches each sleep, so the bar is well below 200.
    expect(ticks).to be >= 20
  end

  it "is interruptible: Timeout.timeout stops a blocked exec and the sandbox keeps working" do
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    expect { Timeout.timeout(1) { sb.exec("sleep", ["60"]) } }.to raise_error(Timeout::Error)
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0).to be < 5
    # The interrupted command was killed in the guest.
    expect(wait_until(timeout: 5) { !sb.exec("ps").stdout.include?("sleep 60") }).to be(true)
    expect(sb.exec("echo", ["ok"]).stdout).to eq("ok\n")
  end

  it "is interruptible by Thread#kill" do
    t = Thread.new { sb.exec("sleep", ["60"]) }
    sleep 0.5
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    t.kill
    expect(t.join(5)).not_to be_nil
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0).to be < 5
  end
end

RSpec.describe "exec as another user and with resource limits" do
  before(:all) { @sb = Microsandbox::Sandbox.create(unique_name("user"), image: rootfs, user: "nobody") }
  after(:all) { @sb&.kill }

  let(:sb) { @sb }

  it "runs as the sandbox's default user, or as user: per call" do
    expect(sb.shell("id -u; id -g").stdout).to eq("65534\n65534\n")
    expect(sb.exec("id", ["-u"], user: "root").stdout).to eq("0\n")
    expect(sb.exec("id", ["-u"], user: "1234:99").stdout).to eq("1234\n")
    expect(sb.exec("id", ["-g"], user: "1234:99").stdout).to eq("99\n")
    expect(sb.exec("touch", ["/etc/forbidden"]).success?).to be(false) # nobody can't write /etc
  end

  it "rejects unknown users" do
    expect { sb.exec("true", user: "ghost") }.to raise_error(Microsandbox::InvalidConfigError, /unknown user/)
  end

  it "applies rlimits" do
    out = sb.shell("ulimit -n; ulimit -Hn", rlimits: { nofile: [32, 64] }, user: "root")
    expect(out.stdout).to eq("32\n64\n")
    expect { sb.exec("true", rlimits: { bogus: 1 }) }.to raise_error(Microsandbox::InvalidConfigError, /rlimit/)
    expect { sb.exec("true", rlimits: { nofile: "x" }) }.to raise_error(TypeError)
    stream = sb.exec_stream("sh", ["-c", "ulimit -n"], rlimits: { nofile: 40 })
    expect(stream.collect.stdout).to eq("40\n")
  end
end
