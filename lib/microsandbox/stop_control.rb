# frozen_string_literal: true

module Microsandbox
  class Sandbox
    # Asks the sandbox to shut down cleanly (killed after `timeout` seconds) and returns
    # at once. Works from any process holding a handle ({Sandbox.get}); does nothing on a
    # handle inherited through `fork` (the VM is the parent's).
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
    # Does nothing on a handle inherited through `fork`.
    # @param timeout [Numeric, nil] most seconds to wait for running commands (nil: no
    #   limit); those still running then are killed by the shutdown
    # @param stop_timeout [Numeric] seconds the shutdown itself may take
    # @return [nil]
    # @raise [SandboxNotRunningError]
    def request_drain(timeout: nil, stop_timeout: DEFAULT_STOP_TIMEOUT)
      @native.request_drain(Validate.timeout!("timeout", timeout), Validate.timeout!("stop_timeout", stop_timeout))
      nil
    end

    # Kills the VM (SIGKILL) and returns at once. Does nothing on a handle inherited
    # through `fork`.
    # @return [nil]
    def request_kill
      @native.request_kill
      nil
    end

    # Waits until the sandbox has stopped, by any cause.
    # @param timeout [Numeric, nil] give up after this many seconds (nil: wait forever)
    # @return [SandboxStopResult] how the run ended (status :stopped or :crashed, source,
    #   exit code or signal of the VM); status :running when `timeout` ran out first
    def wait_until_stopped(timeout: nil)
      seconds = Validate.timeout!("timeout", timeout)
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      stopped = @native.wait_until_stopped(seconds)
      waited = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
      return SandboxStopResult.new(name: name, status: :running, waited_secs: waited) unless stopped

      SandboxStopResult.from_record(name, JSON.parse(@native.last_stop_json), waited_secs: waited)
    end

    # {#stop}, then {#wait}: shuts the guest down cleanly (killed after
    # {DEFAULT_STOP_TIMEOUT} seconds) and says how the VM ended. In a forked child {#stop}
    # does nothing (the VM belongs to the parent), so this waits for the parent to stop it.
    # @return [ExitStatus] exit code 0 after a clean shutdown; 128 + signal when it was
    #   killed (its {ExitStatus#signal})
    def stop_and_wait
      stop
      wait
    end

    # Drains the sandbox ({#request_drain} with its defaults) and returns at once; {#wait}
    # for it to end.
    # @return [nil]
    # @raise [SandboxNotRunningError]
    def drain
      request_drain
    end

    # Waits until the sandbox has stopped, by any cause, and says how the VM ended.
    # @return [ExitStatus] see {#stop_and_wait}
    def wait
      exit_status_of(wait_until_stopped)
    end

    private

    def exit_status_of(result)
      code = result.exit_code || (128 + result.signal if result.signal)
      ExitStatus.new(exit_code: code, signal: result.signal)
    end

    public
  end
end
