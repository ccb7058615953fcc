# frozen_string_literal: true

module Microsandbox
  # One piece of output, or the end, of a streaming exec.
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

    # @return [Boolean]
    def stdout? = kind == :stdout
    # @return [Boolean]
    def stderr? = kind == :stderr
    # @return [Boolean]
    def exited? = kind == :exited

    # @return [String] UTF-8, always valid. From {ExecHandle} it is decoded across the
    #   events of the same stream: a character split between two events appears whole in
    #   the event holding its last byte ("caf", then "é\n"); invalid bytes are U+FFFD.
    #   {#bytes} is exactly what the guest wrote.
    def text
      @text || @bytes.dup.force_encoding(Encoding::UTF_8).scrub("\uFFFD")
    end

    # @return [String]
    def inspect
      exited? ? "#<#{self.class.name} exited code=#{exit_code}>" : "#<#{self.class.name} #{kind} #{bytes.bytesize}B>"
    end
  end

  # The stdin of a streaming exec started with `stdin: :pipe`.
  class ExecStdin
    # @api private
    def initialize(native)
      @native = native
    end

    # Writes bytes to the command's stdin (waits while the guest is not reading).
    # @param data [String]
    # @return [Integer] bytes written
    # @raise [ExecFailedError] when the command has finished
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
  # Enumerable over {ExecEvent}s, ending with one `exited?` event. Single consumer:
  # iterate it from one thread at a time. Leaving `each` early (`break`, an exception)
  # or calling {#close} kills the command.
  class ExecHandle
    include Enumerable

    # @return [Integer, nil] exit status once the `exited` event has been read
    attr_reader :exit_code

    # @api private
    def initialize(native, tty: false)
      @native = native
      @tty = tty
      @done = false
      @exit_code = nil
      @decoders = { stdout: Utf8Stream.new, stderr: Utf8Stream.new }
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

      finished = false
      begin
        while (event = next_event)
          yield event
        end
        finished = true
      ensure
        close unless finished
      end
      self
    end

    # With no block: drains the stream and returns an {ExecOutput}. With a block it is
    # Enumerable#collect (map).
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
    # @return [nil]
    # @raise [InvalidConfigError] the command has no terminal (started without `tty: true`),
    #   or a size is out of range
    # @raise [TypeError] a size is not an Integer
    # @raise [ExecFailedError] the command has finished
    def resize(rows, cols)
      rows = Validate.winsize!("rows", rows)
      cols = Validate.winsize!("cols", cols)
      raise InvalidConfigError, "resize needs a terminal: start the command with tty: true" unless @tty

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

      raw = @native.next_event
      if raw.nil?
        @done = true
        return nil
      end
      kind, a, b = raw
      return ExecEvent.new(kind, bytes: a, text: @decoders.fetch(kind).feed(a)) unless kind == :exited

      @done = true
      @exit_code = a || (b ? 128 + b : -1)
      ExecEvent.new(:exited, exit_code: @exit_code, signal: b)
    end
  end
end
