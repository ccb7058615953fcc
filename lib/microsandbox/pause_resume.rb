# frozen_string_literal: true

module Microsandbox
  # Pause and resume (issue 13): a paused sandbox's VM — memory, devices, the processes in
  # it — is saved to `paused.state` in its directory (0600, about the guest's used memory)
  # and QEMU ends, freeing the memory. Resuming restores it where it was: processes keep
  # running, files and memory are as they were; the guest clock is set from the host. The
  # state file is deleted once resumed, or with the sandbox ({Sandbox.remove}). A state
  # that cannot be resumed boots the sandbox cold from its disk as of the pause: writes
  # still in the guest's page cache then are lost, as after a power cut (`sync` first to
  # keep them).
  class Sandbox
    # Saves the running sandbox to disk and stops its VM; {#resume} (or {Sandbox.start}
    # from any process, e.g. for a detached sandbox) brings it back. Does nothing in a
    # forked child (the VM is its parent's).
    # @param timeout [Numeric] seconds for the clean shutdown used if the save fails
    # @return [nil]
    # @raise [SandboxNotRunningError] when it is not running
    # @raise [UnsupportedError] when it mounts host volumes (anything but `tmpfs:`), which a
    #   saved VM state cannot carry; the sandbox keeps running
    # @raise [RuntimeUnavailableError] when the VM could not be saved (it is stopped then;
    #   starting it boots cold)
    def pause(timeout: DEFAULT_STOP_TIMEOUT)
      seconds = Validate.timeout!("timeout", timeout)
      return nil unless owner?

      @native.pause(seconds || 3600.0)
      nil
    end

    # Resumes this paused sandbox (a {Sandbox.start}: a sandbox that was not paused boots
    # cold). This object then controls the resumed sandbox; `info[:start]` is "resumed".
    # A state that cannot be resumed (runtime changed, file damaged) boots cold and leaves
    # a `system` log entry.
    # @param secrets [Array<Hash>, nil] as for {Sandbox.start} (secret values are never stored)
    # @param tls [Hash, nil] as for {Sandbox.start}
    # @return [self]
    # @raise [SandboxStillRunningError] when it is running
    def resume(secrets: nil, tls: nil)
      resumed = Sandbox.start(name, shell: @shell, secrets: secrets, tls: tls)
      @native = resumed.instance_variable_get(:@native)
      @owner_pid = Process.pid
      @fs = nil
      @info = resumed.info
      self
    end
  
    # A new running sandbox named `name` that is a copy of this one at this instant —
    # memory, processes, disk ("branch like git"). This sandbox is paused while its state
    # is written and its disk copied, then runs on. Before anything of the copy runs it
    # gets fresh entropy, the host clock and its own hostname (this sandbox's `hostname:`
    # if one was given); `info[:start]` is "forked". Commands running here at the fork
    # keep running in the copy too, but their output there goes nowhere. The copy is
    # owned by this process (stopped with it); with a block it is stopped afterwards.
    # @param name [String, Symbol]
    # @yieldparam sandbox [Sandbox]
    # @return [Sandbox, Object] the copy, or the block's value
    # @raise [SandboxNotRunningError] when this sandbox is not running
    # @raise [SandboxAlreadyExistsError] when `name` is taken
    # @raise [InvalidConfigError] for a sandbox with secrets, or in a forked child process
    # @raise [UnsupportedError] when this sandbox mounts host volumes (anything but `tmpfs:`)
    def fork(name, &block)
      copy = Sandbox.new(@native.fork_sandbox(Validate.name!(name)), shell: @shell)
      Sandbox.send(:scoped, copy, &block)
    end
  end
end
