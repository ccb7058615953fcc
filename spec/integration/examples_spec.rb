# frozen_string_literal: true

require "open3"

# The runnable examples, run as a user runs them: they work and leave no sandbox (record
# or directory) behind in the home. (examples/agent and examples/sidekiq have their own
# specs; examples/active_job's job is specced in instrumentation_spec.rb.)
RSpec.describe "examples" do
  def run_example(path, env = {})
    Open3.capture3(env, RbConfig.ruby, "-I", File.expand_path("../../lib", __dir__), File.expand_path("../../#{path}", __dir__))
  end

  def home_state
    [Microsandbox::Sandbox.list.map(&:name).sort, Dir.children(File.join(Microsandbox.home, "sandboxes")).sort]
  end

  it "hello.rb prints its greeting and leaves nothing behind" do
    before = home_state
    out, err, status = run_example("examples/hello.rb")
    expect([err, status.exitstatus]).to eq(["", 0])
    expect(out).to match(/\AHello, World! from hello, kernel \S+\nbooted in \d+\.\ds with qemu\/\w+; exit code 0\n\z/)
    expect(home_state).to eq(before)
  end

  it "active_job/run.rb runs the job inline, prints its events and leaves nothing behind" do
    before = home_state
    out, err, status = run_example("examples/active_job/run.rb", "SANDBOX_IMAGE" => rootfs)
    expect([err, status.exitstatus]).to eq(["", 0])
    expect(out.lines.map { |l| l.split.first }).to eq(%w[create.microsandbox exec.microsandbox job kill.microsandbox remove.microsandbox])
    expect(out).to match(/^job \S+: \{:status=>:done, :exit_code=>2, :stdout=>"hello from \S+\\n", :stderr=>""\}$/)
    expect(home_state).to eq(before)
  end
end
