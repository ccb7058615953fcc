# frozen_string_literal: true

# No write to a streaming command's stdin vanishes: what cannot reach the command raises.
RSpec.describe "exec_stream stdin" do
  before(:all) { @sb = Microsandbox::Sandbox.create(unique_name("stdin"), image: rootfs) }
  after(:all) { @sb&.kill }

  let(:sb) { @sb }

  it "delivers writes with stdin: :pipe, then refuses writes after close" do
    h = sb.exec_stream("cat", stdin: :pipe)
    h.stdin.write("x\n")
    h.stdin.close
    expect { h.stdin.write("lost") }.to raise_error(Microsandbox::StdinClosedError, /already closed/)
    expect(h.collect.stdout).to eq("x\n")
  end

  it "raises on a write after the command finished" do
    h = sb.exec_stream("true", stdin: :pipe)
    expect(h.collect.exit_code).to eq(0)
    expect { h.stdin.write("late") }.to raise_error(Microsandbox::StdinClosedError, /finished/)
  end

  it "runs the 0.5.7 README's streaming example as written (no stdin: given)" do
    h = sb.exec_stream("cat", [])
    h.stdin.write("x\n")
    h.stdin.close
    expect(h.collect.stdout).to eq("x\n")
  end

  it "closes a default stdin at the first read, so a reader ends and later writes raise" do
    expect(sb.exec_stream("cat", []).collect.stdout).to eq("")
    h = sb.exec_stream("sh", ["-c", "cat; echo done"])
    h.stdin.write("a")
    expect(h.each.first.text).to eq("a")
    expect { h.stdin.write("late") }.to raise_error(Microsandbox::StdinClosedError)
    expect(h.collect.stdout).to eq("done\n")
    expect(sb.exec_stream("sh", ["-c", "read x; echo got $x"]).tap { |t| t.stdin << "v\n" }.collect.stdout).to eq("got v\n")
  end

  it "takes the reference's stdin modes and refuses the others" do
    expect(sb.exec("cat", stdin: :null).stdout).to eq("")
    expect(sb.exec("cat", stdin: "in").stdout).to eq("in")
    expect { sb.exec("cat", stdin: :pipe) }.to raise_error(ArgumentError, /exec_stream/)
    expect { sb.exec("cat", stdin: :bogus) }.to raise_error(ArgumentError)
    expect { sb.exec_stream("cat", stdin: :bogus) }.to raise_error(ArgumentError)
  end

  it "raises instead of dropping writes to a command started without a stdin pipe" do
    [sb.exec_stream("cat", stdin: :null), sb.exec_stream("cat", stdin: "fed")].each do |h|
      expect { h.stdin.write("x\n") }.to raise_error(Microsandbox::StdinClosedError, /stdin: :pipe/)
      expect { h.stdin.write("x\n") }.to raise_error(Microsandbox::ExecFailedError)
      h.stdin.close # idempotent, never raises
    end
    expect(sb.exec_stream("cat", stdin: "fed").collect.stdout).to eq("fed")
  end
end
