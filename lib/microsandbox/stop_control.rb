# frozen_string_literal: true

module Microsandbox
  # What {Sandbox#wait_until_stopped} observed.
  SandboxStopResult = Struct.new(:name, :stopped, :waited_secs, keyword_init: true) do
    # @return [Boolean] true when the sandbox is stopped
    def stopped? = stopped
  end

  class Sandbox
    # Asks the sandbox to shut down cleanly (killed after `timeout` seconds) and returns
    # at once. Works from any process holding a handle ({Sandbox.get}).
    # @param timeout [Numeric]
    # @return [nil]
    # @raise [SandboxNotRunningError]
    def request_stop(timeout: DEFAULT_STOP_TIMEOUT)
      @native.request_stop(Validate.timeout!("timeout", timeout))
      nil
    end

    # Kills the VM (SIGKILL) and returns at once.
    # @return [nil]
    def request_kill
      @native.request_kill
      nil
    end

    # Waits until the sandbox has stopped, by any cause.
    # @param timeout [Numeric, nil] give up after this many seconds (nil: wait forever)
    # @return [SandboxStopResult] `stopped?` is false when the wait timed out
    def wait_until_stopped(timeout: nil)
      seconds = Validate.timeout!("timeout", timeout)
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      stopped = @native.wait_until_stopped(seconds)
      SandboxStopResult.new(name: name, stopped: stopped,
                            waited_secs: Process.clock_gettime(Process::CLOCK_MONOTONIC) - started)
    end
  end
end
