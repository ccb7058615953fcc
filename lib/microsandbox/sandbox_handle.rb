# frozen_string_literal: true

require "forwardable"

module Microsandbox
  # A stored sandbox, running or stopped, as {Sandbox.get}, {Sandbox.list} and
  # {Sandbox.list_with} return it: its record (a snapshot taken when the handle was
  # fetched: {#status}, timestamps, labels, create options) plus control from any process
  # ({#stop}, {#kill}, the `request_*` calls, {#wait_until_stopped}).
  #
  # A handle never owns the sandbox: dropping it, or the process exiting, leaves the VM
  # alone. Beyond the reference gem, a handle also runs commands: {#sandbox} connects a
  # live {Sandbox}, and {#exec}, {#shell}, {#fs}, {#logs}, {#metrics} … are forwarded to it.
  #
  # @example
  #   h = Microsandbox::Sandbox.get("worker")   # from any process
  #   h.status                                   # => :running
  #   h.stop_with_timeout(5)
  #   h.wait_until_stopped.stopped?              # => true
  class SandboxHandle
    extend Forwardable

    # Status values the reference gem documents, and which of them this gem reports:
    # `:starting` (booting), `:running`, `:draining` (running, and a drain asked by any
    # process lets its commands finish before it stops), `:stopped`, `:paused` (stopped by
    # {Sandbox#pause} with its VM saved; {Sandbox.start} resumes it), `:crashed` (the last
    # run ended on its own: the VM exited or vanished unasked). `:created` never occurs
    # here (create boots at once).
    STATUSES = %i[created starting running draining paused stopped crashed].freeze

    # The status of a sandbox whose run has ended, from how it ended.
    # @api private
    # @param stop [SandboxStopResult, nil]
    # @return [Symbol] :crashed, :paused or :stopped
    def self.status_of_ended_run(stop)
      return :crashed if stop&.crashed?

      stop&.source == "pause" ? :paused : :stopped
    end

    # @return [String]
    attr_reader :name
    # @return [Symbol] :starting, :running, :draining, :stopped, :paused or :crashed, as
    #   when fetched
    attr_reader :status
    # @return [Hash{String=>String}]
    attr_reader :labels
    # @return [Time] when the sandbox was created
    attr_reader :created_at
    # @return [Time] when its record last changed (started, stopped…)
    attr_reader :updated_at
    # @return [Hash{String=>Object}] the stored create options (image, cpus, memory_mib,
    #   …), without `env` (its values may be secrets)
    attr_reader :config
    # @return [SandboxStopResult, nil] how the last run ended, nil while running
    attr_reader :last_stop

    # @api private
    # @param record [Hash] a native record (`Native::Sandbox.record_json`)
    # @param shell [String, nil] `shell:` for the live {Sandbox} this handle connects
    def initialize(record, shell: nil)
      @name = record.fetch("name")
      stop = record["last_stop"]
      @last_stop = stop && SandboxStopResult.from_record(@name, stop)
      @status = record.fetch("status").to_sym
      @status = SandboxHandle.status_of_ended_run(@last_stop) if @status == :stopped
      @status = :draining if @status == :running && record["draining"] == true
      @labels = record.fetch("labels", {}).freeze
      @detached = record.fetch("detached", false)
      @created_at = Time.at(record.fetch("created_at"))
      @updated_at = Time.at(record.fetch("updated_at"))
      config = JSON.parse(record.fetch("config"))
      config.delete("env") # may hold secrets
      @config = config.freeze
      @shell = shell
    end

    # @return [Boolean] true when it was running (or draining: the VM still runs) when fetched
    def running? = %i[running draining].include?(status)
    # @return [Boolean] true when it was draining when fetched
    def draining? = status == :draining
    # @return [Boolean] true when its VM was not running when fetched (stopped, paused or
    #   crashed)
    def stopped? = %i[stopped paused crashed].include?(status)
    # @return [Boolean] true when it was paused ({Sandbox#pause}) when fetched
    def paused? = status == :paused
    # @return [Boolean] true when its last run crashed
    def crashed? = status == :crashed
    # @return [Boolean] created with `detached: true` (or detached since)
    def detached? = @detached

    # @return [String] {#config} as JSON
    def config_json
      JSON.generate(config)
    end

    # A live handle that runs commands: connects on first use, then kept.
    # @return [Sandbox]
    # @raise [SandboxNotFoundError] when the sandbox was removed meanwhile
    def sandbox
      @sandbox ||= Sandbox.__send__(:connect, name, @shell)
    end
    alias connect sandbox

    # Shuts the guest down cleanly (killed after {Sandbox::DEFAULT_STOP_TIMEOUT} seconds)
    # and waits for it. A stopped sandbox is left alone.
    # @return [nil]
    def stop
      stop_with_timeout(Sandbox::DEFAULT_STOP_TIMEOUT)
    end

    # Like {#stop}, killing the VM after `timeout` seconds.
    # @param timeout [Numeric] seconds (positive)
    # @return [nil]
    def stop_with_timeout(timeout)
      live.stop(timeout: timeout)
    end

    # Kills the VM (SIGKILL) and waits until it is gone.
    # @return [nil]
    def kill
      live.kill
    end

    # Kills the VM and waits up to `timeout` seconds for it to be gone.
    # @param timeout [Numeric] seconds (positive)
    # @return [nil]
    def kill_with_timeout(timeout)
      seconds = Validate.timeout!("timeout", timeout)
      handle = live
      handle.request_kill
      handle.wait_until_stopped(timeout: seconds)
      nil
    end

    # @see Sandbox#request_stop
    def request_stop(...) = live.request_stop(...)
    # @see Sandbox#request_drain
    def request_drain(...) = live.request_drain(...)
    # @see Sandbox#request_kill
    def request_kill = live.request_kill
    # @see Sandbox#wait_until_stopped
    # @return [SandboxStopResult]
    def wait_until_stopped(...) = live.wait_until_stopped(...)

    # Calls of a live {Sandbox}, forwarded to {#sandbox}.
    LIVE_METHODS = %i[exec shell exec_stream shell_stream fs metrics metrics_stream logs log_stream
                      info detach owns_lifecycle? attach attach_shell].freeze
    def_delegators :sandbox, *LIVE_METHODS

    # Removes this (stopped) sandbox.
    # @return [nil]
    # @raise [SandboxStillRunningError]
    def remove
      Sandbox.remove(name)
    end

    # Saves this (stopped) sandbox's disk as the snapshot `name` ({Snapshot.create}).
    # @param name [String]
    # @return [SnapshotInfo]
    # @raise [SnapshotSandboxRunningError, SnapshotAlreadyExistsError]
    def snapshot(name)
      Snapshot.create(self.name, name: name)
    end

    # Saves this (stopped) sandbox's disk as an artifact at `path` ({Snapshot.create}).
    # @param path [String]
    # @return [SnapshotInfo]
    def snapshot_to(path)
      Snapshot.create(self.name, path: path)
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} #{name.inspect} #{status}#{' detached' if detached?}>"
    end

    private

    # The connected live handle, or a fresh one: control calls act on the sandbox's state
    # now, not on the snapshot of this handle.
    def live
      sandbox
    end
  end

  # The reference gem's name for {SandboxHandle} (its 0.5.x read-only record type).
  SandboxInfo = SandboxHandle

  # How a sandbox's run ended, from {Sandbox#wait_until_stopped} (and
  # {SandboxHandle#wait_until_stopped}, {SandboxHandle#last_stop}).
  class SandboxStopResult
    # @return [String]
    attr_reader :name
    # @return [Symbol] :stopped (ended as asked or configured), :crashed (the VM or its
    #   supervisor ended on their own), or :running when a `timeout:` wait ran out first
    attr_reader :status
    # @return [Integer, nil] exit code of the VM process (QEMU) when it exited; 0 after a
    #   clean shutdown
    attr_reader :exit_code
    # @return [Integer, nil] signal that ended the VM process (9 when it was killed)
    attr_reader :signal
    # @return [String, nil] why: "stop", "drain", "kill", "max-duration", "idle-timeout",
    #   "owner-exited", "sigterm", "vm-exited", "agent-link-lost", "supervisor-gone",
    #   "secret-violation" (a `block_and_terminate` secret violation)
    attr_reader :source
    # @return [Time] when the end (or the timed-out wait) was observed
    attr_reader :observed_at
    # @return [Float, nil] seconds {Sandbox#wait_until_stopped} waited
    attr_reader :waited_secs

    # @api private
    def self.from_record(name, rec, waited_secs: nil)
      new(name: name, status: rec.fetch("status").to_sym, exit_code: rec["exit_code"], signal: rec["signal"],
          source: rec["source"], observed_at: Time.at(rec.fetch("observed_at_ms") / 1000.0), waited_secs: waited_secs)
    end

    # @api private
    def initialize(name:, status:, exit_code: nil, signal: nil, source: nil, observed_at: Time.now, waited_secs: nil)
      @name = name
      @status = status
      @exit_code = exit_code
      @signal = signal
      @source = source
      @observed_at = observed_at
      @waited_secs = waited_secs
    end

    # @return [Boolean] true when the run ended as asked or configured (status :stopped);
    #   false after a crash, as in the reference gem, and when a `timeout:` wait ran out
    def stopped? = status == :stopped
    # This gem's earlier meaning of "stopped": the run has ended, by any cause (also a crash).
    # @return [Boolean]
    def stopped = status != :running
    # @return [Boolean] true when the run ended on its own (see {#status})
    def crashed? = status == :crashed

    # @return [String]
    def inspect
      "#<#{self.class.name} #{name.inspect} #{status} source=#{source.inspect} " \
        "exit_code=#{exit_code.inspect} signal=#{signal.inspect}>"
    end
  end
end
