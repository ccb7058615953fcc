# frozen_string_literal: true

# A code-interpreter loop with a stand-in for the model: each step the "model" sees the
# previous observation and answers with code to run, or with a final answer. Swap
# ScriptedModel for your LLM client; the loop and the tool stay the same.
#   SANDBOX_IMAGE=/path/to/rootfs ruby -I lib examples/agent/loop.rb
require_relative "tool_runner"

# Replays fixed tool calls, including the misbehaviours the runner must contain.
class ScriptedModel
  STEPS = [
    { code: "echo 'print(6 * 7)' > /work/answer.py; echo 42 > /work/answer.txt; cat /work/answer.txt" },
    { code: "while :; do :; done", timeout: 2 },                  # never ends: the timeout stops it
    { code: "yes 'spam spam spam'" },                              # floods: the output cap stops it
    { code: "wget -q -T 3 -O- http://203.0.113.10/ || echo no network" }, # the policy ("none") refuses
    { final: "the answer is in /work/answer.txt" }
  ].freeze

  def initialize
    @step = 0
  end

  def next_action(_observation)
    STEPS.fetch(@step).tap { @step += 1 }
  end
end

runner = ToolRunner.new(image: ENV.fetch("SANDBOX_IMAGE", "alpine"), max_output: 4096)
begin
  model = ScriptedModel.new
  observation = nil
  loop do
    action = model.next_action(observation)
    if action[:final]
      puts "final: #{action[:final]}"
      break
    end
    puts "$ #{action[:code]}"
    result = runner.run(action[:code], timeout: action.fetch(:timeout, 10)) { |_stream, text| print text if text.size < 200 }
    observation = result.to_observation
    puts "-> #{[result.stdout.lines.first.to_s.chomp, result.notes].reject(&:empty?).join(' ')}"
  end
ensure
  runner.close
end
