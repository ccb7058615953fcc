# frozen_string_literal: true

# `tty: true` runs a command on a pseudo-terminal in the guest: it is the command's
# stdin/stdout/stderr and controlling terminal, and ExecHandle#resize changes its size.
RSpec.describe "exec on a pseudo-terminal in a real VM" do
  before(:all) { @sb = Microsandbox::Sandbox.create(unique_name("tty"), image: rootfs) }
  after(:all) { @sb&.kill }

  let(:sb) { @sb }

  it "runs the command on a terminal only when asked" do
    expect(sb.shell("tty -s && echo yes || echo no", tty: true).stdout).to eq("yes\r\n")
    expect(sb.shell("tty -s && echo yes || echo no").stdout).to eq("no\n")
    events = sb.shell_stream("tty -s && echo yes; echo err >&2", tty: true).to_a
    expect(events.none?(&:stderr?)).to be(true)
    expect(events.select(&:stdout?).map(&:text).join).to eq("yes\r\nerr\r\n")
  end

  it "starts at the requested size, 24x80 by default" do
    expect(sb.shell("stty size", tty: true).stdout).to eq("24 80\r\n")
    expect(sb.shell_stream("stty size", tty: true, rows: 50, cols: 132).collect.stdout).to eq("50 132\r\n")
  end

  it "is the controlling terminal, with a default TERM" do
    # /dev/tty opens only for a process that has a controlling terminal.
    out = sb.shell("echo via-tty > /dev/tty; echo $TERM", tty: true)
    expect(out.stdout).to eq("via-tty\r\nxterm\r\n")
    expect(sb.shell("echo $TERM", tty: true, env: { "TERM" => "vt100" }).stdout).to eq("vt100\r\n")
  end

  it "reports the exit code of a tty session" do
    expect(sb.shell("exit 7", tty: true).exit_code).to eq(7)
    expect(sb.shell_stream("echo bye; exit 3", tty: true).to_a.last.exit_code).to eq(3)
  end

  it "delivers SIGWINCH and the new size after resize" do
    handle = sb.shell_stream('trap "stty size; exit 0" WINCH; echo ready; while true; do sleep 0.1; done',
                             tty: true)
    out = +""
    resized = false
    last = nil
    Timeout.timeout(60) do
      handle.each do |ev|
        last = ev
        next unless ev.stdout?

        out << ev.text
        if !resized && out.include?("ready")
          handle.resize(40, 120)
          resized = true
        end
      end
    end
    expect(out).to include("40 120\r\n")
    expect(last.exit_code).to eq(0)
    expect { handle.resize(10, 10) }.to raise_error(Microsandbox::ExecFailedError, /finished/)
  end

  it "takes interactive input; closing stdin types end-of-file" do
    handle = sb.exec_stream("cat", tty: true)
    handle.stdin.write("hello\n")
    out = +""
    Timeout.timeout(60) do
      handle.each do |ev|
        out << ev.text if ev.stdout?
        # The terminal echoes the input, then cat prints it.
        handle.stdin.close if out == "hello\r\nhello\r\n"
      end
    end
    expect(out).to eq("hello\r\nhello\r\n")
    expect(handle.exit_code).to eq(0)
  end

  it "ends an interactive shell whose stdin closes before its line editor starts" do
    # The end-of-file typed while the terminal is still in line mode would reach the
    # shell's raw-mode line editor as a NUL byte; it must be typed again.
    handle = sb.exec_stream("sh", tty: true)
    handle.stdin.write("echo hi-$((6*7))\n")
    handle.stdin.close
    out = +""
    Timeout.timeout(60) { handle.each { |ev| out << ev.text if ev.stdout? } }
    expect(out).to include("hi-42\r\n")
    expect(handle.exit_code).to eq(0)
  end

  it "gives the terminal to the session's user" do
    out = sb.shell('stat -c %u "$(tty)"; id -u', tty: true, user: "nobody")
    expect(out.stdout).to eq("65534\r\n65534\r\n")
  end

  it "ignores resize without a terminal (as the reference gem does), refuses bad sizes before anything crosses" do
    handle = sb.exec_stream("sleep", ["30"])
    expect(handle.resize(40, 120)).to be_nil
    expect { handle.resize(0, 80) }.to raise_error(Microsandbox::InvalidConfigError, /rows/)
    expect(handle).not_to be_done
    handle.close
    handle = sb.exec_stream("sleep", ["30"], tty: true)
    expect { handle.resize(0, 80) }.to raise_error(Microsandbox::InvalidConfigError, /rows/)
    expect { handle.resize(24, 65_536) }.to raise_error(Microsandbox::InvalidConfigError, /cols/)
    expect { handle.resize("24", 80) }.to raise_error(TypeError, /rows must be an Integer/)
    handle.close
    expect { sb.exec("true", rows: 10) }.to raise_error(Microsandbox::InvalidConfigError, /tty: true/)
    expect { sb.exec("true", tty: true, cols: -1) }.to raise_error(Microsandbox::InvalidConfigError, /cols/)
    expect { sb.exec_stream("true", tty: "yes") }.to raise_error(TypeError, /tty must be true or false/)
  end
end
