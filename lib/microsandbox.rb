# frozen_string_literal: true

require "rbconfig"

require_relative "microsandbox/version"
require_relative "microsandbox/errors"
require_relative "microsandbox/validate"
require_relative "microsandbox/instrumentation"
require_relative "microsandbox/utf8_stream"
require_relative "microsandbox/text"
require_relative "microsandbox/exit_status"
require_relative "microsandbox/exec_output"
require_relative "microsandbox/exec_handle"

begin
  require "microsandbox/microsandbox_rb"
rescue LoadError => e
  raise LoadError, "the microsandbox native extension is not built (#{e.message}); " \
                   "run `bundle exec rake compile` in the gem checkout"
end

require_relative "microsandbox/fs"
require_relative "microsandbox/patch"
require_relative "microsandbox/network"
require_relative "microsandbox/secrets"
require_relative "microsandbox/templates"
require_relative "microsandbox/net_options"
require_relative "microsandbox/sandbox"
require_relative "microsandbox/attach"
require_relative "microsandbox/sandbox_handle"
require_relative "microsandbox/pool"
require_relative "microsandbox/pause_resume"
require_relative "microsandbox/image"
require_relative "microsandbox/volume"
require_relative "microsandbox/snapshot"
require_relative "microsandbox/metrics"
require_relative "microsandbox/logs"
require_relative "microsandbox/stop_control"
require_relative "microsandbox/doctor"

# Microsandbox: real microVM sandboxes for Ruby. There is no daemon: creating a sandbox
# starts a VM as a child process of this one.
#
# @example
#   require "microsandbox"
#   Microsandbox::Sandbox.create("hello", image: "/srv/rootfs") do |sb|
#     puts sb.shell("echo Hello from $(uname -r)").stdout
#   end
module Microsandbox
  # Version of the runtime (supervisor, guest agent, initramfs) this gem installs. The
  # reference gem downloads an upstream runtime release named by this tag; this gem builds
  # its own runtime from the same source as the gem, so the tag follows {VERSION}.
  RUNTIME_VERSION = "v#{VERSION}"

  # Backend kinds {set_default_backend} knows. Only `:local` runs here.
  BACKEND_KINDS = %i[local cloud].freeze

  @install_lock = Mutex.new
  @runtime_ready = nil
  @runtime_path = nil
  @instrumenter = nil
  @libkrunfw_path = nil
  @default_backend = :local

  class << self
    # @return [String] the gem version
    def version
      VERSION
    end

    # @return [String] {RUNTIME_VERSION}
    def runtime_version
      RUNTIME_VERSION
    end

    # Directory holding the runtime and sandbox state: `$MICROSANDBOX_HOME`, else
    # `~/.microsandbox`.
    # @return [String]
    def home
      env = ENV.fetch("MICROSANDBOX_HOME", "")
      File.expand_path(env.empty? ? File.join(Dir.home, ".microsandbox") : env)
    end

    # Installs the runtime into {home}: the guest kernel (from Debian's
    # linux-image-cloud-amd64 package, fetched with `apt-get download` unless
    # `MICROSANDBOX_KERNEL_DEB` names a .deb), an initramfs with the guest agent and the
    # kernel modules it needs, and the supervisor binary. Idempotent; safe to call from
    # several processes at once.
    # @param force [Boolean] rebuild even when the installed runtime is current
    # @return [nil]
    # @raise [RuntimeUnavailableError] with what to install when something is missing
    def install(force: false)
      install_into(home, force)
    end

    # The reference gem's installer, for code written against it: installs the runtime
    # like {install}.
    #
    # @param base_dir [String, nil] home to install into (default {home}). Sandboxes use
    #   {home}, so point `MICROSANDBOX_HOME` at the same directory to use that runtime
    # @param version [String, nil] nil or {RUNTIME_VERSION} (with or without the "v"):
    #   this gem builds its own runtime and cannot install another release
    # @param force [Boolean] rebuild even when the installed runtime is current
    # @param skip_verify [Boolean] accepted and ignored: nothing is downloaded that a
    #   checksum here could verify (the kernel package comes through apt-get, which
    #   verifies it)
    # @return [nil]
    # @raise [UnsupportedError] for another `version`
    # @raise [RuntimeUnavailableError] with what to install when something is missing
    def setup(base_dir: nil, version: nil, force: false, skip_verify: false) # rubocop:disable Lint/UnusedMethodArgument
      unless version.nil? || [RUNTIME_VERSION, VERSION].include?(version.to_s)
        raise UnsupportedError, "this gem installs runtime #{RUNTIME_VERSION} only (it builds the runtime " \
                                "from its own source); pass version: nil or #{RUNTIME_VERSION.inspect}"
      end

      install_into(base_dir.nil? ? home : File.expand_path(base_dir.to_s), force)
    end

    # @return [Boolean] whether the runtime in {home} is installed and matches this gem build
    def installed?
      Native.installed?(home, libexec("msb-agent"), libexec("msb-supervisor"))
    end

    # Path of the supervisor (`msb`) binary that runs each sandbox: `$MSB_PATH`, else the
    # path set with {runtime_path=}, else `<home>/bin/msb`.
    # @return [String]
    def runtime_path
      env = ENV.fetch("MSB_PATH", "")
      return env unless env.empty?

      @runtime_path || File.join(home, "bin", "msb")
    end

    # Overrides the supervisor binary (below `$MSB_PATH`). Unlike the reference gem's
    # set-once override, a later call replaces it and nil restores the default.
    # @param path [String, Pathname, nil] nil restores the default
    def runtime_path=(path)
      path = path.to_path if path.respond_to?(:to_path)
      @runtime_path = path.nil? ? nil : File.expand_path(Validate.string!("runtime_path", path))
    end

    # The reference gem's libkrunfw override. This gem's VMs run on QEMU with a guest
    # kernel from Debian, not on libkrun, so there is nothing to override: the path is
    # kept (see {libkrunfw_path}) and otherwise ignored. Set-once, like the reference:
    # later calls are ignored.
    # @param path [String, Pathname]
    def libkrunfw_path=(path)
      @libkrunfw_path ||= path.respond_to?(:to_path) ? path.to_path : path.to_s
    end

    # @return [String, nil] what {libkrunfw_path=} was given (unused here)
    attr_reader :libkrunfw_path

    # The backend new sandboxes use. Always `:local`: this gem runs VMs on this host.
    # @return [Symbol] :local
    def default_backend_kind
      @default_backend
    end

    # Selects the backend, as in the reference gem. `:local` (or "local") is the only one
    # this gem has; the options of a remote backend are refused with it.
    # @param kind [String, Symbol] "local" or "cloud"
    # @param url [String, nil] remote backend only
    # @param api_key [String, nil] remote backend only (never shown in messages)
    # @param profile [String, nil] remote backend only
    # @return [nil]
    # @raise [UnsupportedError] for "cloud": this gem has no remote backend
    # @raise [ArgumentError] for an unknown kind, or remote options with "local"
    def set_default_backend(kind, url: nil, api_key: nil, profile: nil)
      @default_backend = backend_kind!(kind, url, api_key, profile)
      nil
    end

    # Runs the block with `kind` as the backend (see {set_default_backend}) and returns
    # its value.
    # @return [Object] the block's value
    # @raise [UnsupportedError, ArgumentError] as {set_default_backend}
    def with_backend(kind, url: nil, api_key: nil, profile: nil)
      raise ArgumentError, "with_backend needs a block" unless block_given?

      backend_kind!(kind, url, api_key, profile)
      yield
    end

    # Installs the runtime on first use unless `MICROSANDBOX_NO_AUTO_INSTALL` is set.
    # Called by {Sandbox.create}; runs the install check once per process and home.
    # @return [nil]
    def ensure_runtime!
      return nil if @runtime_ready == home
      if auto_install_disabled?
        @runtime_ready = home
        return nil
      end

      unless installed?
        warn "[microsandbox] installing the runtime into #{home} " \
             "(set MICROSANDBOX_NO_AUTO_INSTALL to skip)..."
        install
      end
      @runtime_ready = home
      nil
    end

    # @return [Boolean] true when `MICROSANDBOX_NO_AUTO_INSTALL` is set to anything but
    #   "", "0", "false" or "no" (case-insensitive), as in the reference gem
    def auto_install_disabled?
      value = ENV.fetch("MICROSANDBOX_NO_AUTO_INSTALL", "").strip.downcase
      !(value.empty? || %w[0 false no].include?(value))
    end

    # The data of every `#write` ({FS#write}, {ExecStdin#write}, {FsWriteSink#write},
    # {VolumeFs#write}): a String, or an object that converts implicitly (`#to_str`),
    # returned as that String. Anything else is refused before a byte is sent: writing
    # its `to_s` (an IO's inspect, "42") would silently store the wrong bytes.
    # @api private
    # @param data [Object]
    # @return [String] `data` itself when it is a String
    # @raise [TypeError] unless `data` is a String or converts to one
    def coerce_write_bytes(data)
      bytes = String.try_convert(data)
      return bytes if bytes

      raise TypeError, "write data must be a String (got #{data.class}); nothing was written"
    end

    # The text of a file read by {FS#read_text} or {VolumeFs#read_text}: its bytes as a
    # UTF-8 String. No byte is replaced or dropped: bytes that are not valid UTF-8 raise,
    # so the String returned is always valid (`=~`, `split` and friends cannot raise on it
    # later).
    # @api private
    # @param bytes [String] the file's bytes (modified: its encoding becomes UTF-8)
    # @param path [String] for the message
    # @param bytes_method [String] what to call for the bytes instead, for the message
    # @return [String] UTF-8
    # @raise [FilesystemError] the bytes are not valid UTF-8
    def utf8_text(bytes, path, bytes_method)
      text = bytes.force_encoding(Encoding::UTF_8)
      return text if text.valid_encoding?

      raise FilesystemError, "read_text #{path}: the file is not valid UTF-8 text; use #{bytes_method} for its bytes"
    end

    # The instrumenter used for `*.microsandbox` events: the one set with
    # {instrumenter=}, else ActiveSupport::Notifications when it is loaded, else none.
    # @return [#instrument, nil]
    def instrumenter
      return @instrumenter if @instrumenter
      return ::ActiveSupport::Notifications if defined?(::ActiveSupport::Notifications)

      nil
    end

    # @param value [#instrument, nil]
    attr_writer :instrumenter

    private

    def install_into(dir, force)
      @install_lock.synchronize do
        Native.install(dir, libexec("msb-agent"), libexec("msb-supervisor"), force ? true : false)
        @runtime_ready = dir if dir == home
      end
      nil
    end

    def backend_kind!(kind, url, api_key, profile)
      unless kind.is_a?(String) || kind.is_a?(Symbol)
        raise TypeError, "backend kind must be a String or Symbol (got #{kind.class})"
      end

      sym = kind.to_s.downcase.to_sym
      raise ArgumentError, "unknown backend #{kind.to_s.inspect}; use :local" unless BACKEND_KINDS.include?(sym)
      if sym == :cloud
        raise UnsupportedError, "this gem has no remote (cloud) backend: sandboxes run as VMs on this host; " \
                                "use set_default_backend(:local)"
      end
      unless url.nil? && api_key.nil? && profile.nil?
        raise ArgumentError, "url:, api_key: and profile: configure a remote backend; the local backend takes none"
      end

      sym
    end

    public

    # Directory of the helper binaries built with the extension.
    # @api private
    def libexec(binary)
      @libexec_dir ||= begin
        so = $LOADED_FEATURES.find { |f| f.end_with?("/microsandbox/microsandbox_rb.#{RbConfig::CONFIG['DLEXT']}") }
        File.join(so ? File.dirname(so) : File.join(__dir__, "microsandbox"), "libexec")
      end
      File.join(@libexec_dir, binary)
    end
  end
end

# The gem's own virtio-fs daemon (built from the virtiofsd crate by `rake compile`).
Microsandbox::Native.set_virtiofsd_path(Microsandbox.libexec("virtiofsd"))
