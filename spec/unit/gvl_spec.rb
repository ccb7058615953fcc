# frozen_string_literal: true

require "tmpdir"

# Engine calls release the GVL with rb_thread_call_without_gvl2, which skips the call when
# any interrupt flag is set on entry. The thread scheduler's timer sets one whenever
# another Ruby thread wants to run; such a call must be retried, not reported cancelled.
RSpec.describe "engine calls without the GVL" do
  it "are not cancelled by the scheduler's timer while other Ruby threads run" do
    Dir.mktmpdir do |home|
      busy = Array.new(2) { Thread.new { loop { Thread.pass if rand < 0.001 } } }
      begin
        calls = 0
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 3
        while Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
          expect(JSON.parse(Microsandbox::Native.image_prune(home))["bytes_reclaimed"]).to eq(0)
          calls += 1
        end
        expect(calls).to be > 20
      ensure
        busy.each(&:kill).each(&:join)
      end
    end
  end
end
