# frozen_string_literal: true

require "json"

module Microsandbox
  # One entry of a sandbox's log: one chunk of a command's output as the guest wrote it,
  # or one line of the guest console / the supervisor.
  class LogEntry
    # @return [String] "stdout", "stderr" or "system" (the guest console)
    attr_reader :source
    # @return [String] {#data} as UTF-8, always valid: decoded across the chunks of the
    #   same command and stream, so a character the guest wrote in two pieces appears whole
    #   in the entry holding its last byte ("caf", then "é\n"); invalid bytes are U+FFFD
    attr_reader :text
    # @return [String] the exact bytes (ASCII-8BIT), nothing replaced
    attr_reader :data
    # @return [Time, nil] when it was recorded (nil for console lines)
    attr_reader :timestamp

    # @api private
    def initialize(h)
      @source = h.fetch("source")
      @text = h.fetch("text")
      @data = (h["data"] ? h["data"].unpack1("m0") : @text.b).freeze
      @timestamp = h["timestamp_ms"] && Time.at(h["timestamp_ms"] / 1000.0)
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} #{source} #{text[0, 40].inspect}>"
    end
  end

  class Sandbox
    LOG_SOURCES = %w[stdout stderr system].freeze

    # The sandbox's log: output of every command run in it (stdout, stderr) and the
    # guest console (system). Also available after the sandbox stopped.
    # @param tail [Integer] at most this many entries, the most recent
    # @param sources [Array<String>] any of "stdout", "stderr", "system"
    # @return [Array<LogEntry>]
    def logs(tail: 100, sources: LOG_SOURCES)
      tail = Validate.integer!("tail", tail)
      raise InvalidConfigError, "tail must be positive" unless tail.positive?

      list = Validate.string_array!("sources", Array(sources).map(&:to_s))
      JSON.parse(@native.logs_json(tail, list)).map { |h| LogEntry.new(h) }
    end

    # Yields new log entries as they are written, polling every `interval` seconds, until
    # the sandbox stops. Without a block, an Enumerator; stop early with `break`.
    # @param sources [Array<String>]
    # @param interval [Numeric]
    # @yieldparam entry [LogEntry]
    # @return [Enumerator<LogEntry>, nil]
    def log_stream(sources: %w[stdout stderr], interval: 0.5)
      seconds = Validate.timeout!("interval", interval)
      return enum_for(:log_stream, sources: sources, interval: interval) unless block_given?

      seen = logs(tail: 10_000, sources: sources).size
      loop do
        sleep seconds
        entries = logs(tail: 10_000, sources: sources)
        # The log rotates at 8 MiB: if it shrank, start over from its beginning.
        seen = 0 if entries.size < seen
        entries[seen..].each { |e| yield e }
        seen = entries.size
        return nil unless running?
      end
    end
  end
end
