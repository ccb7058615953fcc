# frozen_string_literal: true

module Microsandbox
  # Base class of every error this gem raises. {#code} is a stable kebab-case string
  # that is safe to match on; messages are for humans and may change.
  class Error < StandardError
    # The base class's code, as in the reference gem: an error the engine reports with a
    # code this gem does not know keeps that code instead.
    CODE = "microsandbox-error"

    # @return [String] stable machine-readable code, e.g. "exec-timeout"
    attr_reader :code

    # @param message [String, nil]
    # @param code [String, nil] defaults to the class's code
    def initialize(message = nil, code: nil)
      super(message)
      @code = code || self.class::CODE
    end

    class << self
      # @return [String] the stable code of this class (e.g. `ExecTimeoutError.code`
      #   is "exec-timeout"); instances built for an unknown engine code report that code
      def code
        self::CODE
      end

      # Builds the exception for a code reported by the native engine.
      # @api private
      # @param code [String]
      # @param message [String]
      # @return [Microsandbox::Error]
      def build(code, message)
        (Microsandbox::ERRORS_BY_CODE[code] || Error).new(message, code: code)
      end
    end
  end

  # An option passed to create/exec is invalid (bad name, out-of-range size, NUL bytes…).
  class InvalidConfigError < Error; CODE = "invalid-config"; end
  # A `network:` policy (or a {Rule}/{Destination} for one) is malformed: bad CIDR or
  # address, port `"10-5"`, unknown group, preset, protocol or key… The message names the
  # key (e.g. `network.rules[2].ports[0]`) and what it expects, never the value.
  class NetworkPolicyError < InvalidConfigError; CODE = "network-policy-error"; end
  # A published host port (`ports:`, `ports_udp:`) is already taken by another program or
  # sandbox. Raised by {Sandbox.create} / {Sandbox.start} before the VM starts; nothing is
  # left running. Choose another host port or stop what holds it.
  class PortInUseError < InvalidConfigError; CODE = "port-in-use"; end
  # No sandbox with that name exists.
  class SandboxNotFoundError < Error; CODE = "sandbox-not-found"; end

  # A secret's placeholder was headed to a host it is not allowed for (the message
  # names the secret by its env var, never its value).
  class SecretViolationError < Error; CODE = "secret-violation"; end

  # TLS interception could not be set up: an unreadable or mismatched CA/key, a key file
  # readable by others, an unusable upstream CA.
  class TlsError < Error; CODE = "tls-error"; end

  # A running sandbox already has that name.
  class SandboxAlreadyExistsError < Error; CODE = "sandbox-already-exists"; end
  # The operation needs a stopped sandbox but it is running.
  class SandboxStillRunningError < Error; CODE = "sandbox-still-running"; end
  # The sandbox was stopped or killed, or its VM exited; it cannot serve calls.
  class SandboxNotRunningError < Error; CODE = "sandbox-not-running"; end
  # The sandbox is draining ({Sandbox#request_drain}): it finishes what runs, then stops,
  # and refuses new commands and filesystem calls.
  class SandboxDrainingError < SandboxNotRunningError; CODE = "sandbox-draining"; end
  # The command ran past its `timeout:` and was killed.
  class ExecTimeoutError < Error; CODE = "exec-timeout"; end
  # The command could not be started in the guest (e.g. not found, not executable).
  class ExecFailedError < Error; CODE = "exec-failed"; end
  # A guest or root-filesystem operation failed.
  class FilesystemError < Error
    CODE = "filesystem-error"

    # @return [Integer, nil] the guest errno behind a {Sandbox#fs} failure (e.g. 2 for ENOENT)
    attr_reader :errno
  end
  # A {Sandbox#fs} call named a guest path that does not exist (ENOENT). A
  # {FilesystemError} (with {FilesystemError#errno} 2), so `rescue FilesystemError` still
  # catches it.
  class PathNotFoundError < FilesystemError; CODE = "path-not-found"; end
  # A `patches:` entry or script could not be applied at create; the message names it.
  # Nothing was kept (no sandbox record, VM or directory).
  class PatchFailedError < FilesystemError; CODE = "patch-failed"; end
  # The image (a root directory for now) does not exist.
  class ImageNotFoundError < Error; CODE = "image-not-found"; end
  # {Image.remove} of an image that a sandbox's root disk is built on; the message names
  # the sandboxes. Stop and remove them, or pass `force: true`.
  class ImageInUseError < Error; CODE = "image-in-use"; end
  # Pulling an image failed. Never raised as such: the pull raises one of its subclasses
  # ({RegistryError}, {RegistryAuthError}, {PlatformNotFoundError}), so
  # `rescue ImagePullFailedError`, as written for the reference gem, catches every pull failure.
  class ImagePullFailedError < Error; CODE = "image-pull-failed"; end
  # Metrics collection is disabled for the sandbox.
  #
  # Never raised by this implementation: metrics are read on the host from the VM process
  # and cannot be switched off. The class exists so code written against the reference
  # gem's API (e.g. `rescue Microsandbox::MetricsDisabledError`) keeps working.
  class MetricsDisabledError < Error; CODE = "metrics-disabled"; end
  # Metrics cannot be read on this host for a running sandbox: there is no procfs (a
  # non-Linux host) or the VM process's procfs entries are not readable by this user
  # (e.g. `hidepid`). The sandbox itself is unaffected.
  class MetricsUnavailableError < Error; CODE = "metrics-unavailable"; end
  # The registry failed or could not be reached (also a malformed manifest or a bad blob).
  class RegistryError < ImagePullFailedError; CODE = "registry-error"; end
  # The registry refused the credentials (or demanded some).
  class RegistryAuthError < ImagePullFailedError; CODE = "registry-auth-failed"; end
  # The image has no variant for this host's platform; the message names those offered.
  class PlatformNotFoundError < ImagePullFailedError; CODE = "platform-not-found"; end
  # The runtime (QEMU, guest kernel, agent, supervisor) is missing or cannot be installed.
  class RuntimeUnavailableError < Error; CODE = "runtime-error"; end
  # The VM did not boot, or died while booting.
  class BootFailedError < Error; CODE = "boot-failed"; end
  # The supervisor or the guest sent data that violates the protocol, e.g. a supervisor
  # binary ({Microsandbox.runtime_path}) that is not this gem's prints an unreadable
  # startup report.
  class ProtocolError < Error; CODE = "protocol-error"; end
  # A host I/O operation failed (disk full, permissions, a home path that is not a
  # directory…); the message names the path.
  class IoError < Error; CODE = "io-error"; end
  # The name this gem used for {IoError} before 0.9.0 compatibility; the same class.
  HostIOError = IoError
  # A blocked call was interrupted by something that raises no exception of its own:
  # `Thread#wakeup`/`Thread#run` on the waiting thread, or a signal whose `trap` handler
  # returns. What the call started in the sandbox was stopped (an exec's command is
  # killed). `Thread#kill`, `Thread#raise`, `Timeout.timeout` and Ctrl-C raise their own
  # exception instead.
  class CancelledError < Error; CODE = "cancelled"; end

  # The operation is not supported by this sandbox or backend (e.g. a raw agent-protocol
  # operation this engine does not offer).
  class UnsupportedOperationError < Error; CODE = "unsupported-operation"; end
  # The feature is not available in this build: a remote ("cloud") backend
  # ({Microsandbox.set_default_backend}) or another capability the message names.
  class UnsupportedError < Error; CODE = "unsupported"; end
  # An HTTP call to a remote backend failed. Never raised: this gem runs sandboxes on the
  # local host only ({UnsupportedError} for a remote backend); defined so code written
  # against the reference gem can name it in `rescue`.
  class CloudHttpError < Error; CODE = "cloud-http"; end

  # No volume of that name exists ({Volume.get}, {Volume.remove}, {Volume.fs}, a
  # `volumes:` mount `{ named: }` at {Sandbox.create}).
  class VolumeNotFoundError < Error; CODE = "volume-not-found"; end
  # {Volume.create} with a name that a volume already has.
  class VolumeAlreadyExistsError < Error; CODE = "volume-already-exists"; end
  # {Volume.remove} of a volume a running sandbox mounts; the message names the sandbox.
  class VolumeInUseError < Error; CODE = "volume-in-use"; end

  # No snapshot of that name, digest or path ({Snapshot.get}/{Snapshot.open}/…,
  # `from_snapshot:`).
  class SnapshotNotFoundError < Error; CODE = "snapshot-not-found"; end
  # {Snapshot.create}/{Snapshot.import} onto an existing snapshot (without `force: true`).
  class SnapshotAlreadyExistsError < Error; CODE = "snapshot-already-exists"; end
  # {Snapshot.create} of a sandbox that is not stopped.
  class SnapshotSandboxRunningError < Error; CODE = "snapshot-sandbox-running"; end
  # Never raised: this gem's snapshot disks are flattened (they hold the image's files),
  # so booting one never needs the image. Defined for `rescue` clauses written against
  # the reference gem.
  class SnapshotImageMissingError < Error; CODE = "snapshot-image-missing"; end
  # A snapshot's manifest or disk does not match its digests (truncated, edited): it is
  # never booted ({Snapshot.verify}, `from_snapshot:`, {Snapshot.open}, {Snapshot.import}).
  class SnapshotIntegrityError < Error; CODE = "snapshot-integrity"; end

  # A forked child called an object its parent opened before `fork` — an exec stream
  # ({ExecHandle}), a file stream ({FsReadStream}/{FsWriteSink}) or an image pull. Its
  # connection belongs to the parent, which keeps using it; the child must open its own.
  # (`close` on such an object does nothing in the child.)
  class InheritedHandleError < Error; CODE = "inherited-handle"; end
  # A write to a streaming command's stdin ({ExecStdin#write}) cannot reach it: stdin was
  # closed ({ExecStdin#close}), the command was started without a stdin pipe (no
  # `stdin: :pipe` or `tty: true`), or it has finished. An {ExecFailedError}, which such
  # writes raised before.
  class StdinClosedError < ExecFailedError; CODE = "stdin-closed"; end
  # A write to a streaming command's stdin after the command stopped taking it: it
  # closed its stdin (broken pipe, e.g. `head -c1` after one byte) or writing it failed
  # in the guest. The stream reported it first as a `:stdin_error` event
  # ({ExecEvent#stdin_error?}), whose message, like this one, says how many bytes reached
  # the command. A {StdinClosedError}: stop writing; the output and exit status still
  # arrive.
  class StdinBrokenError < StdinClosedError; CODE = "stdin-broken"; end

  # {Pool#checkout} found no ready sandbox within its `timeout:` (the pool is still
  # filling, or creates are failing: the message says the last failure).
  class PoolTimeoutError < Error; CODE = "pool-timeout"; end
  # {Pool#checkout} after {Pool#shutdown}.
  class PoolClosedError < Error; CODE = "pool-closed"; end

  # Every error class by its code.
  ERRORS_BY_CODE = [
    Error, InvalidConfigError, NetworkPolicyError, PortInUseError, SandboxNotFoundError, SandboxAlreadyExistsError,
    SandboxStillRunningError, SandboxNotRunningError, SandboxDrainingError, ExecTimeoutError, ExecFailedError,
    FilesystemError, PathNotFoundError, PatchFailedError, ImageNotFoundError, ImageInUseError,
    ImagePullFailedError, MetricsDisabledError, MetricsUnavailableError,
    RegistryError, RegistryAuthError, PlatformNotFoundError,
    RuntimeUnavailableError, BootFailedError, ProtocolError, IoError, CancelledError,
    UnsupportedOperationError, UnsupportedError, CloudHttpError,
    VolumeNotFoundError, VolumeAlreadyExistsError, VolumeInUseError, SnapshotNotFoundError, SnapshotAlreadyExistsError,
    SnapshotSandboxRunningError, SnapshotImageMissingError, SnapshotIntegrityError,
    SecretViolationError, TlsError,
    InheritedHandleError, StdinClosedError, StdinBrokenError, PoolTimeoutError, PoolClosedError
  ].to_h { |c| [c::CODE, c] }.freeze
end
