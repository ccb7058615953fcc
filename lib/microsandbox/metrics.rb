# frozen_string_literal: true

require "json"

module Microsandbox
  # Resource usage of a sandbox, measured on the host from its VM process (the guest is
  # not asked, so it cannot misreport).
  #
  # Three fields of the reference gem are always nil here because only the guest knows
  # them and its word is not trusted: {#memory_available_bytes} (the guest kernel's
  # MemAvailable), {#upper_used_bytes} and {#upper_free_bytes} (the guest's view of its
  # writable root filesystem). The host-side measures are {#memory_host_resident_bytes}
  # and {#upper_host_allocated_bytes}.
  class Metrics
    FIELDS = %i[cpu_percent memory_bytes memory_limit_bytes disk_read_bytes disk_write_bytes
                net_rx_bytes net_tx_bytes uptime_secs vcpu_time_ns memory_host_resident_bytes
                upper_host_allocated_bytes].freeze
    # Fields only the guest could report (always nil, see the class comment).
    GUEST_ONLY_FIELDS = %i[memory_available_bytes upper_used_bytes upper_free_bytes].freeze

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
    # @return [Integer] CPU time the VM process used since boot (all vCPU and device
    #   threads), nanoseconds: an upper bound of the vCPUs' own time
    attr_reader :vcpu_time_ns
    # @return [Integer] resident memory of the VM process on the host, bytes (= {#memory_bytes})
    attr_reader :memory_host_resident_bytes
    # @return [Integer, nil] bytes the host allocated for the sandbox's writable root disk
    attr_reader :upper_host_allocated_bytes
    # @return [Time] when the sample was taken
    attr_reader :timestamp

    # @api private
    def initialize(hash)
      FIELDS.each { |f| instance_variable_set(:"@#{f}", hash.fetch(f.to_s)) }
      @timestamp = Time.at(0, hash.fetch("timestamp_ms"), :millisecond)
    end

    # @return [nil] not measured: only the guest knows it (see the class comment)
    def memory_available_bytes = nil
    # @return [nil] not measured: only the guest knows it (see the class comment)
    def upper_used_bytes = nil
    # @return [nil] not measured: only the guest knows it (see the class comment)
    def upper_free_bytes = nil

    # @return [Hash{Symbol=>Numeric, Time, nil}]
    def to_h
      (FIELDS + GUEST_ONLY_FIELDS + [:timestamp]).to_h { |f| [f, public_send(f)] }
    end

    # @return [String]
    def inspect
      format("#<%s cpu=%.1f%% mem=%dMiB uptime=%.0fs>", self.class.name, cpu_percent, memory_bytes >> 20, uptime_secs)
    end
  end

  # Metrics of one sandbox sampled every `interval` seconds until it stops
  # ({Sandbox#metrics_stream}). Enumerable: `each` yields {Metrics}; leave early with
  # `break`. Each `each` starts sampling afresh.
  class MetricsStream
    include Enumerable

    # @return [Float] seconds between samples
    attr_reader :interval

    # @api private
    def initialize(sandbox, interval)
      @sandbox = sandbox
      @interval = interval
    end

    # Yields a sample every {#interval} seconds; returns when the sandbox is stopped.
    # @yieldparam metrics [Metrics]
    # @return [self, Enumerator]
    # @raise [MetricsUnavailableError]
    def each
      return enum_for(:each) unless block_given?

      loop do
        started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        begin
          sample = @sandbox.metrics
        rescue SandboxNotRunningError
          return self
        end
        yield sample
        rest = @interval - (Process.clock_gettime(Process::CLOCK_MONOTONIC) - started)
        sleep rest if rest.positive?
      end
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} #{@sandbox.name} every #{@interval}s>"
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

    # Metrics every `interval` seconds until the sandbox stops. Without a block, a
    # {MetricsStream} (Enumerable); with one, yields each sample and returns nil. Stop
    # early with `break`.
    # @param interval [Numeric] seconds between samples (each sample takes 0.25 s)
    # @yieldparam metrics [Metrics]
    # @return [MetricsStream, nil]
    def metrics_stream(interval: 1.0, &block)
      stream = MetricsStream.new(self, Validate.timeout!("interval", interval))
      return stream unless block

      stream.each(&block)
      nil
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
