# frozen_string_literal: true

require "securerandom"

module Microsandbox
  # One piece of output, or the end, of a streaming exec.
  #
  # Names of the reference gem 0.9.0 ({#type}, {#data}, {#code}, {#pid}, {#started?},
  # {#failed?}, {#stdin_error?}) and of this gem ({#kind}, {#bytes}, {#exit_code},
  # {#signal}) both work. This gem produces `:stdout`, `:stderr` and `:exited` events only:
  # a command that cannot start, times out or loses its sandbox raises a typed error from
  # {ExecHandle#each} ({ExecFailedError}, {ExecTimeoutError}, {SandboxNotRunningError})
  # instead of yielding a `:failed` event, and a stdin write that cannot reach the command
  # raises from {ExecStdin#write} instead of a `:stdin_error` event. The predicates for
  # those kinds exist (always false) so code written for the reference keeps running.
  class ExecEvent
    # @return [Symbol] :stdout, :stderr or :exited
    attr_reader :kind
    # @return [String] raw bytes (ASCII-8BIT); empty for :exited
    attr_reader :bytes
    # @return [Integer, nil] exit status for :exited (128 + signal when killed)
    attr_reader :exit_code
    # @return [Integer, nil] the signal that killed the process, for :exited
    attr_reader :signal

    # @api private
    def initialize(kind, bytes: "".b, exit_code: nil, signal: nil, text: nil)
      @kind = kind
      @bytes = bytes.b.freeze
      @exit_code = exit_code
      @signal = signal
      @text = text&.freeze
    end

    # @return [Symbol] the event kind (the reference's name for {#kind})
    def type = kind

    # @return [String, nil] raw bytes (ASCII-8BIT) of an output event; nil for :exited
    def data
      exited? ? nil : @bytes
    end

    # @return [Integer, nil] the exit code of an :exited event, else nil
    def code
      exited? ? @exit_code : nil
    end

    # @return [nil] the guest process id is not reported (there is no :started event)
    def pid = nil

    # @return [Boolean]
    def stdout? = kind == :stdout
    # @return [Boolean]
    def stderr? = kind == :stderr
    # @return [Boolean]
    def exited? = kind == :exited
    # @return [Boolean] always false: no :started event is produced
    def started? = kind == :started
    # @return [Boolean] always false: start failures raise {ExecFailedError}
    def failed? = kind == :failed
    # @return [Boolean] always false: stdin failures raise from {ExecStdin#write}
    def stdin_error? = kind == :stdin_error

    # @return [String, nil] UTF-8, always valid; nil for :exited. From {ExecHandle} it is
    #   decoded across the events of the same stream: a character split between two events
    #   appears whole in the event holding its last byte ("caf", then "é\n"); invalid bytes
    #   are U+FFFD. {#bytes}/{#data} is exactly what the guest wrote.
    def text
      exited? ? nil : (@text || Text.lossy_utf8(@bytes))
    end

    # @return [String]
    def inspect
      exited? ? "#<#{self.class.name} exited code=#{exit_code}>" : "#<#{self.class.name} #{kind} #{bytes.bytesize}B>"
    end
  end

  # The stdin of a streaming exec (see the `stdin:` modes of {Sandbox#exec_stream}).
  class ExecStdin
    # @api private
    def initialize(native)
      @native = native
    end

    # Writes bytes to the command's stdin (waits while the guest is not reading).
    # @param data [String]
    # @return [Integer] bytes written
    # @raise [StdinClosedError] (an {ExecFailedError}) when the bytes cannot reach the
    #   command: stdin was closed, the command was started without `stdin: :pipe` (or
    #   `tty: true`), or it has finished
    def write(data)
      data = Validate.string!("data", data)
      @native.write_stdin(data.b)
      data.bytesize
    end

    # @param data [String]
    # @return [self]
    def <<(data)
      write(data)
      self
    end

    # Closes stdin (the command sees end of file). Idempotent.
    # @return [nil]
    def close
      @native.close_stdin
      nil
    end
  end

  # A running command whose output arrives as it is produced (see {Sandbox#exec_stream}).
  #
  # Enumerable over {ExecEvent}s, ending with one `exited?` event. Single pass and single
  # consumer: iterate it from one thread at a time. Leaving `each` early (`break`, an
  # exception) leaves the command running and the rest of its events for a later
  # {#each}, {#collect} or {#wait}; {#close} (or {#kill}) ends the command.
  #
  # A handle belongs to the process that opened it: in a forked child every call raises
  # {InheritedHandleError} except {#close}, which does nothing there.
  class ExecHandle
    include Enumerable

    # @return [Integer, nil] exit status once the `exited` event has been read
    attr_reader :exit_code

    # @return [String] an id for this command, unique in this process (for logs and
    #   correlation; it is not the guest pid)
    attr_reader :id

    # @api private
    def initialize(native, tty: false, auto_close_stdin: false)
      @native = native
      @tty = tty
      @auto_close_stdin = auto_close_stdin
      @done = false
      @exit_code = nil
      @decoders = { stdout: Utf8Stream.new, stderr: Utf8Stream.new }
      @signal = nil
      @id = SecureRandom.uuid.freeze
    end

    # @return [Boolean] true when the command runs on a pseudo-terminal (`tty: true`)
    def tty?
      @tty
    end

    # Yields each event as it arrives. Without a block, returns an Enumerator.
    # @yieldparam event [ExecEvent]
    # @return [self]
    # @raise [ExecTimeoutError, ExecFailedError, SandboxNotRunningError]
    def each
      return enum_for(:each) unless block_given?

      while (event = next_event)
        yield event
      end
      self
    end

    # Waits for the command to finish, discarding the output not read yet.
    # @return [ExitStatus]
    # @raise [ExecTimeoutError, ExecFailedError, SandboxNotRunningError]
    def wait
      each { |_| nil }
      ExitStatus.new(exit_code: @exit_code, signal: @signal)
    end

    # With no block: drains the stream and returns an {ExecOutput}. With a block it is
    # Enumerable#collect (map).
    # After a partial {#each}, only the events not yet read are collected.
    # @return [ExecOutput, Array]
    def collect(&block)
      return super if block

      out = +"".b
      err = +"".b
      last = nil
      each do |ev|
        case ev.kind
        when :stdout then out << ev.bytes
        when :stderr then err << ev.bytes
        else last = ev
        end
      end
      ExecOutput.new(exit_code: last&.exit_code, signal: last&.signal, stdout: out, stderr: err)
    end

    # @return [ExecStdin] the command's stdin (writable when started with `stdin: :pipe`
    #   or `tty: true`)
    def stdin
      @stdin ||= ExecStdin.new(@native)
    end

    # Sends a signal to the command's process group.
    # @param signal [Integer] signal number, e.g. 15
    # @return [nil]
    def signal(signal)
      @native.signal(Validate.integer!("signal", signal))
      nil
    end

    # Changes the size of the command's terminal; the guest kernel sends SIGWINCH to the
    # terminal's foreground process group.
    # @param rows [Integer] 1..65535
    # @param cols [Integer] 1..65535
    # Without a terminal (started without `tty: true`) there is nothing to resize and
    # this does nothing, as in the reference gem.
    # @return [nil]
    # @raise [InvalidConfigError] a size is out of range
    # @raise [TypeError] a size is not an Integer
    # @raise [ExecFailedError] the command has finished
    def resize(rows, cols)
      rows = Validate.winsize!("rows", rows)
      cols = Validate.winsize!("cols", cols)
      return nil unless @tty

      @native.resize(rows, cols)
      nil
    end

    # Kills the command (SIGKILL); the stream then ends with its `exited` event.
    # @return [nil]
    def kill
      signal(9)
    end

    # @return [Boolean] true once the `exited` event was read or the handle was closed
    def done?
      @done
    end

    # Stops reading and kills the command if it still runs. Idempotent.
    # @return [nil]
    def close
      @done = true
      @native.close
      nil
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} #{@done ? "done exit_code=#{@exit_code.inspect}" : 'running'}>"
    end

    private

    def next_event
      return nil if @done

      if @auto_close_stdin
        # Started without `stdin:`: what was written before the first read is all there
        # is, so the command sees end of file now instead of waiting forever.
        @auto_close_stdin = false
        @native.close_stdin
      end

      raw = @native.next_event
      if raw.nil?
        @done = true
        return nil
      end
      kind, a, b = raw
      return ExecEvent.new(kind, bytes: a, text: @decoders.fetch(kind).feed(a)) unless kind == :exited

      @done = true
      @signal = b
      @exit_code = a || (b ? 128 + b : -1)
      ExecEvent.new(:exited, exit_code: @exit_code, signal: b)
    end
  end
end
