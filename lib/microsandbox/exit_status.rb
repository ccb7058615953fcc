# frozen_string_literal: true

module Microsandbox
  # How something finished: a command ({ExecHandle#wait}) or, with the lifecycle
  # methods, a sandbox. An immutable value.
  class ExitStatus
    # @return [Integer, nil] the exit status (128 + signal number when killed by a signal);
    #   nil when none is known
    attr_reader :exit_code
    # @return [Integer, nil] the signal that ended it, if one did
    attr_reader :signal

    # @param exit_code [Integer, nil]
    # @param signal [Integer, nil]
    def initialize(exit_code:, signal: nil)
      @exit_code = exit_code
      @signal = signal
      freeze
    end

    # @return [Boolean] true when the exit status is 0
    def success?
      @exit_code == 0 # rubocop:disable Style/NumericPredicate -- nil is not a success
    end

    # @return [Boolean] the opposite of {#success?}
    def failure?
      !success?
    end

    # @return [Hash{Symbol=>Integer, nil}]
    def to_h
      { exit_code: @exit_code, signal: @signal }
    end

    # @return [Boolean] equal exit code and signal
    def ==(other)
      other.is_a?(ExitStatus) && other.to_h == to_h
    end
    alias eql? ==

    # @return [Integer]
    def hash
      to_h.hash
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} exit_code=#{@exit_code.inspect}#{" signal=#{@signal}" if @signal}>"
    end
  end
end
