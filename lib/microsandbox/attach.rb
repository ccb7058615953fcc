# frozen_string_literal: true

require "io/console"

module Microsandbox
  class Sandbox
    # Default detach sequence of {#attach}: Ctrl-P then Ctrl-Q, as in `docker attach`.
    DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"

    # Runs a command on a terminal in the guest and connects it to this process's
    # terminal (the reference gem's host-TTY attach): keystrokes go to the command, its
    # output to `$stdout`, the guest terminal's size follows this terminal's (SIGWINCH),
    # and `$stdin` is in raw mode meanwhile when it is a terminal (restored on return, also
    # on exceptions) — so Ctrl-C goes to the command. Without a host terminal, `$stdin` is
    # forwarded until its end (then the guest terminal gets its end-of-file character).
    # Returns when the command exits, or at once when the detach sequence is typed: the
    # command then keeps running, unread, while this Sandbox object lives (there is no
    # re-attach; it is killed when this process exits, like every command it started).
    #
    # @param command [String]
    # @param args [Array<String>]
    # @param cwd [String, nil]
    # @param user [String, nil]
    # @param env [Hash{String=>String}, nil]
    # @param detach_keys [String, nil] comma-separated keys ("ctrl-p,ctrl-q", the default;
    #   "ctrl-<letter>" or a single character)
    # @param rlimits [Hash, nil] as for {#exec}
    # @return [Integer] the command's exit code (128 + signal when killed), or 0 after a detach
    # @raise [ArgumentError] for malformed `detach_keys`
    # @raise [ExecFailedError, SandboxNotRunningError] as {#exec_stream}
    def attach(command, args = [], cwd: nil, user: nil, env: nil, detach_keys: nil, rlimits: nil)
      keys = Attach.parse_keys(detach_keys || DEFAULT_DETACH_KEYS)
      input = $stdin
      rows, cols = Attach.winsize(input)
      handle = exec_stream(command, args, cwd: cwd, user: user, env: env, rlimits: rlimits, tty: true, rows: rows, cols: cols)
      code = Attach.new(handle, input, $stdout, keys).run
      (@detached_attachments ||= []) << handle if code.nil?
      code || 0
    end

    # {#attach} of the sandbox's shell (`shell:` at create, default "/bin/sh").
    # @return [Integer] see {#attach}
    def attach_shell
      attach(@shell)
    end

    # The terminal pump behind {Sandbox#attach}. Output and input are pumped by two
    # threads; the calling thread only waits on a queue. That is what makes SIGWINCH
    # work: Ruby runs `trap` handlers on the main thread, and a main thread blocked in a
    # native call (waiting for output) would only run them when the next output arrives.
    # @api private
    class Attach
      # Host terminal size, or 24x80 when `io` is not a terminal.
      def self.winsize(io)
        return [24, 80] unless io.respond_to?(:tty?) && io.tty?

        rows, cols = io.winsize
        rows.to_i.positive? && cols.to_i.positive? ? [rows, cols] : [24, 80]
      rescue SystemCallError
        [24, 80]
      end

      # "ctrl-p,ctrl-q" → "\x10\x11".
      def self.parse_keys(spec)
        raise ArgumentError, "detach_keys must be a String (got #{spec.class})" unless spec.is_a?(String)

        keys = spec.split(",").map do |k|
          k = k.strip
          if (m = k.match(/\Actrl-([a-z@\[\\\]^_])\z/i))
            (m[1].upcase.ord & 0x1f).chr
          elsif k.length == 1
            k
          else
            raise ArgumentError, "invalid detach key #{k.inspect}: use \"ctrl-<letter>\" or one character"
          end
        end
        raise ArgumentError, "detach_keys is empty" if keys.empty?

        keys.join.b
      end

      def initialize(handle, input, output, keys)
        @handle = handle
        @input = input
        @output = output
        @keys = keys
        @events = Queue.new
      end

      # @return [Integer, nil] the exit code, or nil after a detach
      def run
        return pump unless tty?

        previous = Signal.trap("WINCH") { @events << [:winch] }
        begin
          @input.raw { pump }
        ensure
          Signal.trap("WINCH", previous || "DEFAULT")
        end
      end

      private

      def tty?
        @input.respond_to?(:tty?) && @input.tty?
      end

      def pump
        threads = [spawn { pump_output }, spawn { pump_input }]
        loop do
          kind, value = @events.pop
          case kind
          when :winch then @handle.resize(*self.class.winsize(@input))
          when :exited then return value
          when :detached then return nil
          when :error then raise value
          end
        end
      ensure
        threads&.each(&:kill)
      end

      def spawn(&block)
        Thread.new do
          Thread.current.report_on_exception = false
          block.call
        rescue Exception => e # rubocop:disable Lint/RescueException -- handed to the waiting thread
          @events << [:error, e]
        end
      end

      def pump_output
        code = nil
        @handle.each do |ev|
          raise ExecFailedError, ev.data if ev.failed? # the command could not be started
          next if ev.started? || ev.stdin_error?

          if ev.exited?
            code = ev.exit_code
          else
            @output.write(ev.bytes)
            @output.flush
          end
        end
        @events << [:exited, code]
      end

      # Keystrokes to the command until EOF or the detach sequence. A partial match is
      # held back until the next key says whether it completes the sequence.
      def pump_input
        held = "".b
        loop do
          data = @input.readpartial(4096).b
          data.each_char do |c|
            held << c
            return @events << [:detached] if held == @keys
            next if @keys.start_with?(held)

            @handle.stdin.write(held)
            held = "".b
          end
        end
      rescue EOFError, IOError # end of input, or $stdin closed under us
        @handle.stdin.write(held) unless held.empty?
        @handle.stdin.close
      rescue StdinClosedError
        nil # the command has ended: pump_output reports how
      end
    end
  end
end
