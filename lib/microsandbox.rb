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
require_relative "microsandbox/sandbox"
require_relative "microsandbox/sandbox_info"
require_relative "microsandbox/image"
require_relative "microsandbox/metrics"
require_relative "microsandbox/logs"
require_relative "microsandbox/stop_control"

# Microsandbox: real microVM sandboxes for Ruby. There is no daemon: creating a sandbox
# starts a VM as a child process of this one.
#
# @example
#   require "microsandbox"
#   Microsandbox::Sandbox.create("hello", image: "/srv/rootfs") do |sb|
#     puts sb.shell("echo Hello from $(uname -r)").stdout
#   end
module Microsandbox
  @install_lock = Mutex.new
  @runtime_ready = nil
  @runtime_path = nil
  @instrumenter = nil

  class << self
    # @return [String] the gem version
    def version
      VERSION
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
      @install_lock.synchronize do
        Native.install(home, libexec("msb-agent"), libexec("msb-supervisor"), force ? true : false)
        @runtime_ready = home
      end
      nil
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

    # Overrides the supervisor binary (below `$MSB_PATH`).
    # @param path [String, nil] nil restores the default
    def runtime_path=(path)
      @runtime_path = path.nil? ? nil : File.expand_path(Validate.string!("runtime_path", path))
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

    # @return [Boolean] true when `MICROSANDBOX_NO_AUTO_INSTALL` is set (non-empty)
    def auto_install_disabled?
      !ENV.fetch("MICROSANDBOX_NO_AUTO_INSTALL", "").empty?
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
