# frozen_string_literal: true

require "io/console"

module Microsandbox
  class CLI
    # Connects a command running in a sandbox to this process's terminal or pipes:
    # streams its stdout/stderr bytes as they arrive, copies our stdin to it when asked
    # (`-i`), and on a terminal (`-t`) puts our terminal in raw mode for the duration and
    # forwards window-size changes (SIGWINCH) to the guest's pseudo-terminal.
    class Terminal
      # Bytes read from our stdin per write to the command's.
      CHUNK = 64 * 1024

      # @param stdin [IO] @param stdout [IO] @param stderr [IO]
      def initialize(stdin, stdout, stderr)
        @in = stdin
        @out = stdout
        @err = stderr
      end

      # Runs `cmd` in `sandbox` attached to our streams and returns its exit status.
      # @param interactive [Boolean] copy our stdin to the command (else it reads EOF)
      # @param tty [Boolean] run it on a guest pseudo-terminal (stderr merges into stdout)
      # @return [Integer] the command's exit status (128+N when signal N killed it)
      # @raise [Interrupt] after killing the command, when we get SIGINT
      def attach(sandbox, cmd, args, interactive:, tty:, **exec_options)
        options = exec_options.dup
        options.merge!(tty: true, rows: size[0], cols: size[1]) if tty
        options[:stdin] = interactive ? :pipe : (tty ? nil : :null)
        raw = tty && interactive && @in.tty?
        mode = raw ? @in.console_mode : nil
        handle = sandbox.exec_stream(cmd, args, **options)
        begin
          # Raw before the first read of stdin: keys reach the guest one by one, and Ctrl-C
          # is a byte for the guest's terminal rather than a signal for us.
          @in.raw! if raw
          pump = interactive ? pump_stdin(handle) : nil
          previous_winch = tty && @in.tty? ? forward_winch(handle) : nil
          # Output is drained on its own thread; this one only joins it. Ruby runs trap
          # handlers (SIGWINCH, SIGINT) on the main thread, and a main thread blocked in
          # the native wait for output would run them only when the next output arrives.
          drainer = Thread.new do
            Thread.current.report_on_exception = false
            drain(handle)
          end
          drainer.value
        rescue Interrupt
          close_quietly(handle)
          raise
        ensure
          drainer&.kill
          pump&.kill
          Signal.trap("WINCH", previous_winch || "DEFAULT") if tty && @in.tty?
          @in.console_mode = mode if mode
        end
      end

      private

      # Writes every output event's bytes, unchanged, as they come; returns the status.
      def drain(handle)
        @out.sync = true
        @err.sync = true
        handle.each do |event|
          if event.stdout? then @out.write(event.bytes)
          elsif event.stderr? then @err.write(event.bytes)
          elsif event.failed? then raise ExecFailedError, event.data # exit status 126/127
          end
        end
        handle.exit_code
      end

      # Copies our stdin to the command until EOF, which closes the command's stdin (on a
      # terminal: types the EOF character). Bytes the command no longer accepts (it
      # exited or closed its stdin) have no reader left; the thread then ends.
      def pump_stdin(handle)
        Thread.new do
          Thread.current.report_on_exception = false
          stdin = handle.stdin
          begin
            loop { stdin.write(@in.readpartial(CHUNK)) }
          rescue EOFError
            begin
              stdin.close
            rescue Microsandbox::Error
              nil
            end
          rescue Microsandbox::Error, IOError
            nil
          end
        end
      end

      # Resizes the guest terminal whenever ours changes. The trap handler only starts
      # a thread: the resize call blocks on the sandbox, which a trap context must not.
      def forward_winch(handle)
        Signal.trap("WINCH") do
          Thread.new do
            rows, cols = size
            handle.resize(rows, cols)
          rescue Microsandbox::Error
            nil
          end
        end
      end

      # Our terminal's [rows, cols], 24x80 when there is none.
      def size
        io = [@in, @out].find(&:tty?)
        rows, cols = io ? io.winsize : [24, 80]
        rows.to_i.positive? && cols.to_i.positive? ? [rows, cols] : [24, 80]
      rescue SystemCallError, NotImplementedError
        [24, 80]
      end

      def close_quietly(handle)
        handle.kill
      rescue Microsandbox::Error
        nil
      end
    end
  end
end
