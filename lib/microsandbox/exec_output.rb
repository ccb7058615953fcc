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
    # @return [String, nil] nil when all of the `stdin:` bytes reached the command;
    #   otherwise why and how many did not (it closed its stdin — `head -c1` — or exited
    #   before reading them). Not an error: the command ran and {#exit_code} is its own,
    #   as with `printf … | head -c1` in a shell. Bytes that reached its stdin pipe but
    #   that it never read are not counted (as with any pipe). This gem's addition: the
    #   reference gem does not report them.
    attr_reader :stdin_error

    # @api private
    def initialize(exit_code:, signal:, stdout:, stderr:, stdin_error: nil)
      @signal = signal
      @exit_code = exit_code || (signal ? 128 + signal : -1)
      @stdout_bytes = stdout.b.freeze
      @stderr_bytes = stderr.b.freeze
      @stdin_error = stdin_error&.dup&.force_encoding(Encoding::UTF_8)&.scrub&.freeze
    end

    # @return [Boolean] true when the command exited with status 0
    def success?
      @exit_code.zero?
    end

    # @return [Boolean] true when the command exited with a non-zero status
    def failure?
      !success?
    end

    # @return [String] stdout as valid UTF-8: bytes that are not UTF-8 become U+FFFD
    #   ({#stdout_bytes} has them unchanged)
    def stdout
      Text.lossy_utf8(@stdout_bytes)
    end

    # @return [String] stderr as valid UTF-8 (see {#stdout})
    def stderr
      Text.lossy_utf8(@stderr_bytes)
    end

    # @return [String] {#stdout}, so `puts sb.exec(...)` prints the output
    def to_s
      stdout
    end

    # @return [ExitStatus] the exit code and signal as an {ExitStatus}
    def status
      ExitStatus.new(exit_code: @exit_code, signal: @signal)
    end

    # @return [Hash{Symbol => Object}]
    def to_h
      { exit_code: @exit_code, signal: @signal, stdout: stdout, stderr: stderr }
    end

    # @return [String]
    def inspect
      stdin = @stdin_error ? " stdin_error=#{@stdin_error.inspect}" : ""
      "#<#{self.class.name} exit_code=#{@exit_code} stdout=#{@stdout_bytes.bytesize}B stderr=#{@stderr_bytes.bytesize}B#{stdin}>"
    end
  end
end
