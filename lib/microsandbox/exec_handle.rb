# frozen_string_literal: true

require "securerandom"

module Microsandbox
  # One thing that happened in a streaming exec. A stream yields, in this order:
  # `:started` (with {#pid}), then `:stdout`/`:stderr` output and at most one
  # `:stdin_error`, in the order they happened, then `:exited` (with {#code}); or, for a
  # command that could not be started, a single `:failed` event (with the guest errno
  # as {#code} and the reason as {#data}).
  #
  # Names of the reference gem 0.9.0 ({#type}, {#data}, {#code}, {#pid}, {#started?},
  # {#failed?}, {#stdin_error?}) and of this gem ({#kind}, {#bytes}, {#exit_code},
  # {#signal}) both work.
  class ExecEvent
    # @return [Symbol] :started, :stdout, :stderr, :stdin_error, :exited or :failed
    attr_reader :kind
    # @return [String] raw bytes (ASCII-8BIT) of an output event; empty for the others
    attr_reader :bytes
    # @return [Integer, nil] exit status for :exited (128 + signal when killed)
    attr_reader :exit_code
    # @return [Integer, nil] the signal that killed the process, for :exited
    attr_reader :signal
    # @return [Integer, nil] the command's process id in the guest, for :started
    attr_reader :pid

    # @api private
    def initialize(kind, bytes: "".b, exit_code: nil, signal: nil, text: nil, pid: nil, errno: nil, message: nil)
      @kind = kind
      @bytes = bytes.b.freeze
      @exit_code = exit_code
      @signal = signal
      @text = text&.freeze
      @pid = pid
      @errno = errno
      @message = message&.dup&.force_encoding(Encoding::UTF_8)&.scrub&.freeze
    end

    # @return [Symbol] the event kind (the reference's name for {#kind})
    def type = kind

    # @return [String, nil] raw bytes (ASCII-8BIT) of an output event; the message
    #   (UTF-8) of a :failed or :stdin_error event; nil for :started and :exited
    def data
      case kind
      when :stdout, :stderr then @bytes
      when :failed, :stdin_error then @message
      end
    end

    # @return [Integer, nil] the exit code of an :exited event; the guest errno of a
    #   :failed event (e.g. 2 for a command not found, 13 for permission denied) or of a
    #   :stdin_error event (32, EPIPE: the command closed its stdin; nil when it ended
    #   before taking the bytes); else nil
    def code
      case kind
      when :exited then @exit_code
      when :failed, :stdin_error then @errno
      end
    end

    # @return [Boolean]
    def stdout? = kind == :stdout
    # @return [Boolean]
    def stderr? = kind == :stderr
    # @return [Boolean]
    def exited? = kind == :exited
    # @return [Boolean] true for the first event of a command that runs (see {#pid})
    def started? = kind == :started
    # @return [Boolean] true when the command could not be started (see {#code}, {#data})
    def failed? = kind == :failed
    # @return [Boolean] true when bytes written to stdin did not reach the command: it
    #   closed its stdin or ended before taking them. {#data} says how many; later writes
    #   raise {StdinBrokenError} (or {StdinClosedError} once it has finished).
    def stdin_error? = kind == :stdin_error

    # @return [String, nil] UTF-8, always valid: the output of :stdout/:stderr, the
    #   message of :failed/:stdin_error; nil for :started and :exited. From {ExecHandle}
    #   output is decoded across the events of the same stream: a character split between
    #   two events appears whole in the event holding its last byte ("caf", then "é\n");
    #   invalid bytes are U+FFFD. {#bytes}/{#data} is exactly what the guest wrote.
    def text
      case kind
      when :stdout, :stderr then @text || Text.lossy_utf8(@bytes)
      when :failed, :stdin_error then @message
      end
    end

    # @return [String]
    def inspect
      case kind
      when :exited then "#<#{self.class.name} exited code=#{exit_code}>"
      when :started then "#<#{self.class.name} started pid=#{pid}>"
      when :failed, :stdin_error then "#<#{self.class.name} #{kind} code=#{code.inspect} #{@message.inspect}>"
      else "#<#{self.class.name} #{kind} #{bytes.bytesize}B>"
      end
    end
  end

  # The stdin of a streaming exec (see the `stdin:` modes of {Sandbox#exec_stream}).
  class ExecStdin
    # @api private
    def initialize(native)
      @native = native
    end

    # Writes bytes to the command's stdin (waits while the guest is not reading).
    # Returning means the bytes are on their way; if the command then does not take
    # them (it closes its stdin, or ends first), the stream says so with a
    # `:stdin_error` event ({ExecEvent#stdin_error?}) and later writes raise.
    # @param data [String]
    # @return [Integer] bytes written
    # @raise [StdinClosedError] (an {ExecFailedError}) when the bytes cannot reach the
    #   command: stdin was closed, the command was started without `stdin: :pipe` (or
    #   `tty: true`), or it has finished
    # @raise [StdinBrokenError] (a {StdinClosedError}) the command has stopped taking
    #   stdin (it closed it: broken pipe); the message says how many bytes reached it
    def write(data)
      data = Microsandbox.coerce_write_bytes(data)
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
  # Enumerable over {ExecEvent}s: `:started` first, output (and at most one
  # `:stdin_error`) as it happens, ending with one `exited?` event — or a single
  # `failed?` event when the command could not be started. Single pass and single
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
      @failed_message = nil
      @id = SecureRandom.uuid.freeze
    end

    # @return [Boolean] true when the command runs on a pseudo-terminal (`tty: true`)
    def tty?
      @tty
    end

    # Yields each event as it arrives. Without a block, returns an Enumerator. A command
    # that cannot be started yields one `:failed` event (it does not raise here).
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
    # @raise [ExecFailedError] the command could not be started (its `:failed` event)
    # @raise [ExecTimeoutError, SandboxNotRunningError]
    def wait
      each { |ev| raise_failed(ev) }
      raise_failed_earlier
      ExitStatus.new(exit_code: @exit_code, signal: @signal)
    end

    # With no block: drains the stream and returns an {ExecOutput} (whose
    # {ExecOutput#stdin_error} carries a `:stdin_error` event's message). With a block it
    # is Enumerable#collect (map).
    # After a partial {#each}, only the events not yet read are collected.
    # @return [ExecOutput, Array]
    # @raise [ExecFailedError] the command could not be started (its `:failed` event)
    # @raise [ExecTimeoutError, SandboxNotRunningError]
    def collect(&block)
      return super if block

      out = +"".b
      err = +"".b
      stdin_error = nil
      each do |ev|
        case ev.kind
        when :stdout then out << ev.bytes
        when :stderr then err << ev.bytes
        when :stdin_error then stdin_error = ev.data
        when :exited then nil # kept in @exit_code/@signal, also when an earlier #each read it
        else raise_failed(ev)
        end
      end
      raise_failed_earlier
      ExecOutput.new(exit_code: @exit_code, signal: @signal, stdout: out, stderr: err,
                     stdin_error: stdin_error)
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

    # `collect` and `wait` have no exit status to return for a command that never ran.
    def raise_failed(event)
      raise ExecFailedError, event.data if event.failed?
    end

    # An earlier {#each} read the `:failed` event: the command still never ran.
    def raise_failed_earlier
      raise ExecFailedError, @failed_message if @failed_message
    end

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
      case kind
      when :stdout, :stderr then ExecEvent.new(kind, bytes: a, text: @decoders.fetch(kind).feed(a))
      when :started then ExecEvent.new(:started, pid: a)
      when :stdin_error then ExecEvent.new(:stdin_error, message: a, errno: b)
      when :failed
        @done = true
        @failed_message = a
        ExecEvent.new(:failed, message: a, errno: b)
      else
        @done = true
        @signal = b
        @exit_code = a || (b ? 128 + b : -1)
        ExecEvent.new(:exited, exit_code: @exit_code, signal: b)
      end
    end
  end
end
