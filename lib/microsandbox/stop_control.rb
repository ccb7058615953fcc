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

    # Drains the sandbox and returns at once: from now on it refuses new commands and
    # filesystem calls ({SandboxDrainingError}), lets those already running finish, then
    # shuts the guest down cleanly (killed after `stop_timeout` seconds). Works from any
    # process holding a handle ({Sandbox.get}); follow it with {#wait_until_stopped}.
    # @param timeout [Numeric, nil] most seconds to wait for running commands (nil: no
    #   limit); those still running then are killed by the shutdown
    # @param stop_timeout [Numeric] seconds the shutdown itself may take
    # @return [nil]
    # @raise [SandboxNotRunningError]
    def request_drain(timeout: nil, stop_timeout: DEFAULT_STOP_TIMEOUT)
      @native.request_drain(Validate.timeout!("timeout", timeout), Validate.timeout!("stop_timeout", stop_timeout))
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
