# frozen_string_literal: true

require "json"

module Microsandbox
  # Resource usage of a sandbox, measured on the host from its VM process (the guest is
  # not asked, so it cannot misreport).
  class Metrics
    FIELDS = %i[cpu_percent memory_bytes memory_limit_bytes disk_read_bytes disk_write_bytes
                net_rx_bytes net_tx_bytes uptime_secs].freeze

    # @return [Float] CPU over the last 250 ms, percent of one host core
    attr_reader :cpu_percent
    # @return [Integer] resident memory of the VM, bytes
    attr_reader :memory_bytes
    # @return [Integer] guest memory size, bytes
    attr_reader :memory_limit_bytes
    # @return [Integer] bytes read from the VM's disks since boot
    attr_reader :disk_read_bytes
    # @return [Integer] bytes written to the VM's disks since boot
    attr_reader :disk_write_bytes
    # @return [Integer] guest network bytes received (0: no network device yet)
    attr_reader :net_rx_bytes
    # @return [Integer] guest network bytes sent (0: no network device yet)
    attr_reader :net_tx_bytes
    # @return [Float] seconds since the VM started
    attr_reader :uptime_secs

    # @api private
    def initialize(hash)
      FIELDS.each { |f| instance_variable_set(:"@#{f}", hash.fetch(f.to_s)) }
    end

    # @return [Hash{Symbol=>Numeric}]
    def to_h
      FIELDS.to_h { |f| [f, public_send(f)] }
    end

    # @return [String]
    def inspect
      format("#<%s cpu=%.1f%% mem=%dMiB uptime=%.0fs>", self.class.name, cpu_percent, memory_bytes >> 20, uptime_secs)
    end
  end

  class Sandbox
    # Current resource usage (samples CPU for 250 ms; the GVL is released meanwhile).
    # @return [Metrics]
    # @raise [SandboxNotRunningError]
    # @raise [MetricsUnavailableError] this host cannot read the VM's statistics (no procfs)
    def metrics
      Metrics.new(JSON.parse(@native.metrics_json))
    end

    # Metrics every `interval` seconds until the sandbox stops. Without a block, an
    # Enumerator; stop early with `break`.
    # @param interval [Numeric] seconds between samples (at least 0.25)
    # @yieldparam metrics [Metrics]
    # @return [Enumerator<Metrics>, nil]
    def metrics_stream(interval: 1.0)
      seconds = Validate.timeout!("interval", interval)
      return enum_for(:metrics_stream, interval: interval) unless block_given?

      loop do
        started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        begin
          yield metrics
        rescue SandboxNotRunningError
          return nil
        end
        rest = seconds - (Process.clock_gettime(Process::CLOCK_MONOTONIC) - started)
        sleep rest if rest.positive?
      end
    end
  end

  class << self
    # Metrics of every running sandbox in {home}, sampled concurrently.
    # @return [Hash{String => Metrics}]
    def all_sandbox_metrics
      JSON.parse(Native.all_metrics_json(home)).transform_values { |m| Metrics.new(m) }
    end
  end
end
