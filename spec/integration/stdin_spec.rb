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

  it "raises instead of dropping writes to a command started without a stdin pipe" do
    [sb.exec_stream("cat", []), sb.exec_stream("cat", stdin: "fed")].each do |h|
      expect { h.stdin.write("x\n") }.to raise_error(Microsandbox::StdinClosedError, /stdin: :pipe/)
      expect { h.stdin.write("x\n") }.to raise_error(Microsandbox::ExecFailedError)
      h.stdin.close # idempotent, never raises
    end
    expect(sb.exec_stream("cat", stdin: "fed").collect.stdout).to eq("fed")
  end
end
