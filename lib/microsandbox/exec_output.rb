# frozen_string_literal: true

module Microsandbox
  # The collected result of {Sandbox#exec} / {Sandbox#shell}.
  class ExecOutput
    # @return [Integer] the exit status; 128 + signal number when killed by a signal
    attr_reader :exit_code
    # @return [Integer, nil] the signal that killed the process, if any
    attr_reader :signal
    # @return [String] raw stdout bytes (ASCII-8BIT)
    attr_reader :stdout_bytes
    # @return [String] raw stderr bytes (ASCII-8BIT)
    attr_reader :stderr_bytes

    # @api private
    def initialize(exit_code:, signal:, stdout:, stderr:)
      @signal = signal
      @exit_code = exit_code || (signal ? 128 + signal : -1)
      @stdout_bytes = stdout.b.freeze
      @stderr_bytes = stderr.b.freeze
    end

    # @return [Boolean] true when the command exited with status 0
    def success?
      @exit_code.zero?
    end

    # @return [String] stdout as UTF-8, always valid: bytes that are not UTF-8 are U+FFFD
    #   ({#stdout_bytes} keeps them)
    def stdout
      @stdout_bytes.dup.force_encoding(Encoding::UTF_8).scrub("\uFFFD")
    end

    # @return [String] stderr as UTF-8, always valid (see {#stdout})
    def stderr
      @stderr_bytes.dup.force_encoding(Encoding::UTF_8).scrub("\uFFFD")
    end

    # @return [Hash{Symbol => Object}]
    def to_h
      { exit_code: @exit_code, signal: @signal, stdout: stdout, stderr: stderr }
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} exit_code=#{@exit_code} stdout=#{@stdout_bytes.bytesize}B stderr=#{@stderr_bytes.bytesize}B>"
    end
  end
end
