# frozen_string_literal: true

require "pty"
require "io/console"
require "io/wait"
require "open3"
require "rbconfig"

# Sandbox#attach connects the host terminal to a command on a guest terminal. Driven
# through a real pseudo-terminal: a child Ruby attaches (from another process, through
# Sandbox.get), this process types into the child's terminal. Every wait is bounded: a
# child that does not exit in time is killed and the example fails.
RSpec.describe "attaching the host terminal" do
  lib = File.expand_path("../../lib", __dir__)

  before(:all) do
    @sb = Microsandbox::Sandbox.create(unique_name("attach"), image: rootfs)
  end

  after(:all) { @sb&.stop }

  # Reads from `io` until `pattern` appears or `timeout` seconds pass; returns what was read.
  def read_until(io, pattern, timeout: 90)
    buf = +""
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    until buf.match?(pattern)
      left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
      break if left <= 0
      next unless io.wait_readable([left, 0.5].min)

      begin
        buf << io.readpartial(4096)
      rescue EOFError, Errno::EIO
        break
      end
    end
    buf
  end

  # Waits up to `timeout` seconds for `pid`; kills it if it is still there. Returns its status or nil.
  def reap(pid, timeout: 30)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      _, status = Process.waitpid2(pid, Process::WNOHANG)
      return status if status
      break if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.1
    end
    Process.kill(:KILL, pid)
    Process.waitpid(pid)
    nil
  end

  define_method(:child_script) do |call|
    <<~RUBY
      $LOAD_PATH.unshift(#{lib.inspect})
      require "microsandbox"
      code = Microsandbox::Sandbox.get(#{@sb.name.inspect}).#{call}
      require "io/console"
      echo = $stdin.tty? ? $stdin.echo? : "-" # raw mode (no echo) must be over
      $stdout.write("\\r\\nECHO=\#{echo} EXIT=\#{code}\\r\\n")
    RUBY
  end

  # Runs `call` in a child Ruby on a fresh pseudo-terminal of 30x100; yields its master side.
  def attach_in_pty(call)
    status = nil
    PTY.spawn(RbConfig.ruby, "-e", child_script(call)) do |r, w, pid|
      r.winsize = [30, 100]
      yield r, w
    ensure
      status = reap(pid)
    end
    expect(status).not_to be_nil, "the attached child did not exit"
    expect(status.success?).to be(true)
  end

  it "runs a command on a guest terminal sized like the host's, and returns its exit code" do
    attach_in_pty('attach("sh")') do |r, w|
      expect(read_until(r, /[#$] \S*\z/)).to match(/[#$] /) # the guest shell's prompt
      w.write("stty size; tty; echo mark-$((6*7)); exit 3\r")
      out = read_until(r, /EXIT=\d+/)
      expect(out).to include("30 100", "/dev/pts/", "mark-42")
      expect(out).to match(/EXIT=3\b/)
    end
  end

  it "follows the host terminal's size at once (SIGWINCH) and restores the terminal mode" do
    attach_in_pty('attach("sh")') do |r, w|
      expect(read_until(r, /[#$] \S*\z/)).to match(/[#$] /)
      # Nothing is typed now: busybox's line editor redraws its prompt on SIGWINCH, which
      # it gets only if the resize reaches the guest while the host has no output to read.
      # The shell prints its prompt a moment before it starts reading keys; a SIGWINCH in
      # that gap is remembered until the next key instead of redrawing, so a slow guest can
      # miss the first resize. Each new size is another SIGWINCH: three tries, each bounded.
      cols = 120
      redrawn = (1..3).any? do |try|
        cols = 120 + try
        r.winsize = [40, cols]
        read_until(r, /\e\[J/, timeout: 20).include?("\e[J")
      end
      expect(redrawn).to be(true), "no prompt redraw after three resizes"
      w.write("stty size; exit 0\r")
      out = read_until(r, /EXIT=\d+/)
      expect(out).to include("40 #{cols}")
      expect(out).to match(/ECHO=true EXIT=0\b/)
    end
  end

  it "returns 0 at once on the detach keys; attach_shell uses the sandbox shell" do
    attach_in_pty("attach_shell") do |r, w|
      expect(read_until(r, /[#$] \S*\z/)).to match(/[#$] /)
      w.write("\x10") # Ctrl-P, held back until the next key
      sleep 0.3
      w.write("\x11") # Ctrl-Q completes the detach sequence
      expect(read_until(r, /EXIT=\d+/)).to match(/EXIT=0\b/)
    end
  end

  it "works without a host terminal: stdin is forwarded until its end" do
    out = nil
    Open3.popen2e(RbConfig.ruby, "-e", child_script('attach("sh")')) do |i, o, t|
      i.write("echo piped-$((2+3)); exit 4\n")
      i.close
      out = read_until(o, /EXIT=\d+/)
      unless t.join(30)
        Process.kill(:KILL, t.pid)
        t.join
      end
      expect(t.value.success?).to be(true)
    end
    expect(out).to include("piped-5")
    expect(out).to match(/EXIT=4\b/)
  end

  it "parses detach keys" do
    parse = Microsandbox::Sandbox::Attach.method(:parse_keys)
    expect(parse.call("ctrl-p,ctrl-q")).to eq("\x10\x11".b)
    expect(parse.call("ctrl-a, x")).to eq("\x01x".b)
    expect { parse.call("ctrl-pp") }.to raise_error(ArgumentError, /detach key/)
    expect { parse.call("") }.to raise_error(ArgumentError)
    expect { @sb.attach("sh", detach_keys: "nope") }.to raise_error(ArgumentError, /detach key/)
  end
end
