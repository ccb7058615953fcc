# frozen_string_literal: true

require "json"

module Microsandbox
  # One entry of a sandbox's log: one chunk of a command's output as the guest wrote it,
  # or one line of the guest console / the supervisor.
  class LogEntry
    # @return [Symbol] :stdout, :stderr or :system (the guest console and the supervisor)
    attr_reader :source
    # @return [String] {#data} as UTF-8, always valid: decoded across the chunks of the
    #   same command and stream, so a character the guest wrote in two pieces appears whole
    #   in the entry holding its last byte ("caf", then "é\n"); invalid bytes are U+FFFD
    attr_reader :text
    # @return [String] the exact bytes (ASCII-8BIT), nothing replaced
    attr_reader :data
    # @return [Integer, nil] the guest session (one command) that wrote it; nil for
    #   :system entries
    attr_reader :session_id
    # @return [String] an opaque position just after this entry: pass it as
    #   `log_stream(from_cursor:)` to read only what follows
    attr_reader :cursor
    # @return [Time, nil] when it was recorded (nil for console lines: the guest console
    #   carries no wall-clock time)
    attr_reader :timestamp

    # @api private
    def initialize(h)
      @source = h.fetch("source").to_sym
      @text = h.fetch("text").freeze
      @data = (h["data"] ? h["data"].unpack1("m0") : @text.b).freeze
      @session_id = h["session_id"]
      @cursor = h.fetch("cursor").freeze
      @timestamp = h["timestamp_ms"] && Time.at(0, h["timestamp_ms"], :millisecond)
      freeze
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} #{source} #{text[0, 40].inspect}>"
    end
  end

  # Log entries of one sandbox as an Enumerable ({Sandbox#log_stream}). Each {#each}
  # replays the history the stream was asked for (from `since_ms:` or after
  # `from_cursor:`, else from the start of the kept log) and, with `follow: true`, then
  # waits for new entries (polling every `interval` seconds) until the sandbox stops or
  # `until_ms` passes. Without `follow`, it ends at the end of what is logged now.
  class LogStream
    include Enumerable

    # @api private
    def initialize(sandbox, sources:, since_ms:, until_ms:, from_cursor:, follow:, interval:)
      @sandbox = sandbox
      @sources = sources
      @since_ms = since_ms
      @until_ms = until_ms
      @from_cursor = from_cursor
      @follow = follow
      @interval = interval
    end

    # @return [Boolean] whether the stream waits for new entries
    def follow?
      @follow
    end

    # Without `follow:`, one bounded read (like {Sandbox#logs}). With `follow:`, the history,
    # then every `interval` seconds only what was logged since: each poll reads just the
    # bytes appended to the log files, follows a rotation of the output log (no entry lost
    # or repeated), and the stream ends once the sandbox stopped (after a last poll) or
    # `until_ms` has passed.
    # @yieldparam entry [LogEntry]
    # @return [self, Enumerator]
    # @raise [InvalidConfigError] an unknown source or a malformed cursor
    def each(&block)
      return enum_for(:each) unless block_given?

      unless @follow
        @sandbox.__send__(:log_entries, nil, @from_cursor ? nil : @since_ms, @until_ms, @from_cursor, @sources).each(&block)
        return self
      end

      follower = nil
      loop do
        # Whether the sandbox still runs is checked before reading, so a final read after
        # it stopped still returns what it logged last.
        live = @sandbox.running? && !past_until?
        entries =
          if follower
            JSON.parse(follower.poll_json).map { |h| LogEntry.new(h) }
          else
            follower, history = @sandbox.__send__(:log_follow, @from_cursor ? nil : @since_ms, @until_ms, @from_cursor,
                                                  @sources)
            history
          end
        entries.each(&block)
        return self unless live

        sleep @interval
      end
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} #{@sandbox.name}#{' follow' if @follow}>"
    end

    private

    def past_until?
      @until_ms && (Time.now.to_r * 1000) >= @until_ms
    end
  end

  class Sandbox
    # Sources an entry can have; `logs`/`log_stream` also take "output" (stdout and stderr)
    # and "all".
    LOG_SOURCES = %w[stdout stderr system].freeze

    # The sandbox's log: output of every command run in it (stdout, stderr) and the
    # guest console and supervisor (system). Also available after the sandbox stopped.
    # Reads are bounded: the log keeps the last 8-16 MiB of output, of which the last
    # 4 MiB per file are read.
    # @param tail [Integer, nil] at most this many entries, the most recent (nil: all)
    # @param since_ms [Integer, Time, nil] only entries recorded at or after this time
    #   (Unix milliseconds); console lines carry no time and are left out when a time
    #   bound is given
    # @param until_ms [Integer, Time, nil] only entries recorded before this time
    # @param sources [Array<String, Symbol>, nil] any of "stdout", "stderr", "system",
    #   "output" (stdout and stderr), "all" (nil: all)
    # @return [Array<LogEntry>]
    # @raise [ArgumentError] a negative tail or time
    # @raise [InvalidConfigError] an unknown source
    def logs(tail: nil, since_ms: nil, until_ms: nil, sources: nil)
      unless tail.nil?
        tail = Validate.integer!("tail", tail)
        raise ArgumentError, "tail must be zero or positive (got #{tail})" if tail.negative?
      end
      log_entries(tail, log_time!("since_ms", since_ms), log_time!("until_ms", until_ms), nil, log_sources!(sources))
    end

    # A {LogStream} of this sandbox's log: the history from `since_ms:` (or after
    # `from_cursor:`, or all that is kept), then, with `follow: true`, new entries as they
    # are written until the sandbox stops. With a block, iterates it and returns nil.
    # @param sources [Array<String, Symbol>, nil] as for {#logs}
    # @param since_ms [Integer, Time, nil]
    # @param from_cursor [String, nil] a {LogEntry#cursor}: start after that entry
    # @param until_ms [Integer, Time, nil] stop at entries recorded at or after this time
    # @param follow [Boolean] keep waiting for new entries
    # @param interval [Numeric] seconds between polls when following
    # @yieldparam entry [LogEntry]
    # @return [LogStream, nil]
    def log_stream(sources: nil, since_ms: nil, from_cursor: nil, until_ms: nil, follow: false, interval: 0.5, &block)
      stream = LogStream.new(self, sources: log_sources!(sources), since_ms: log_time!("since_ms", since_ms),
                                   until_ms: log_time!("until_ms", until_ms),
                                   from_cursor: from_cursor.nil? ? nil : Validate.string!("from_cursor", from_cursor),
                                   follow: follow ? true : false, interval: Validate.timeout!("interval", interval))
      return stream unless block

      stream.each(&block)
      nil
    end

    private

    def log_entries(tail, since_ms, until_ms, cursor, sources)
      JSON.parse(@native.logs_json(tail, since_ms, until_ms, cursor, sources)).map { |h| LogEntry.new(h) }
    end

    # The history a follow-mode {LogStream} starts with, and the native follower that then
    # reads only what is new.
    # @return [Array(Native::LogFollower, Array<LogEntry>)]
    def log_follow(since_ms, until_ms, cursor, sources)
      follower, json = @native.log_follow(since_ms, until_ms, cursor, sources)
      [follower, JSON.parse(json).map { |h| LogEntry.new(h) }]
    end

    def log_sources!(sources)
      return [] if sources.nil?

      Array(sources).map do |s|
        raise TypeError, "sources must be Strings or Symbols (got #{s.class})" unless s.is_a?(String) || s.is_a?(Symbol)

        Validate.utf8!("sources", s.to_s)
      end
    end

    def log_time!(name, value)
      return nil if value.nil?
      return (value.to_r * 1000).floor if value.is_a?(Time)
      raise TypeError, "#{name} must be Integer Unix milliseconds or a Time (got #{value.class})" unless value.is_a?(Integer)
      raise ArgumentError, "#{name} must not be negative (got #{value})" if value.negative?

      value
    end
  end
end
