# frozen_string_literal: true

module Microsandbox
  # Templates (warm starts). The first {Sandbox.create} of a configuration — registry
  # image digest, memory, CPUs, disk size, log level, NIC, runtime (kernel, agent,
  # supervisor, QEMU) — boots a VM to its agent's ready state with nothing of any sandbox
  # inside, saves it under `<home>/templates/<id>/` (the QEMU state and the frozen disk
  # layer; directory 0700, files 0400) and restores it for that sandbox; later creates of
  # the same configuration only restore it (a few hundred ms instead of a boot). Before
  # any patch, script or command runs, the restored guest gets fresh host entropy (its
  # random pool is reseeded), the host's clock and its own hostname; its disk is its own
  # copy-on-write layer over the template's. A template that cannot be built or restored
  # (a corrupt or truncated state file, say) makes the create boot cold and leaves a
  # `system` log entry. Local directory roots always boot cold.
  #
  # Off for one create with `template: false`, for all with `MICROSANDBOX_TEMPLATES=off`.
  module Templates
    # Environment variable that turns templates off (`0`, `off`, `false`, `no`).
    ENV_VAR = "MICROSANDBOX_TEMPLATES"

    # Checks the `template:` option of {Sandbox.create}.
    # @param value [Boolean]
    # @return [Boolean]
    # @raise [TypeError] for anything but true or false
    def self.option!(value)
      raise TypeError, "template must be true or false (got #{value.class})" unless [true, false].include?(value)

      value
    end
  end
end
