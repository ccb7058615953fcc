# frozen_string_literal: true

module Microsandbox
  class CLI
    # Pull progress for humans, on stderr: on a terminal, one bar per layer, redrawn in
    # place (at most 10 times a second); elsewhere (a log file, CI), one line per layer
    # when it completes, so logs stay readable.
    class Progress
      WIDTH = 30
      REDRAW_INTERVAL = 0.1

      # @param io [IO] where to draw (stderr)
      def initialize(io)
        @io = io
        @tty = io.tty?
        @layers = {} # digest => [done, total], in the order first seen
        @completed = {}
        @drawn = 0
        @last_draw = 0.0
      end

      # @param event [PullProgress]
      def update(event)
        @layers[event.digest] = [event.done.to_i, event.total.to_i]
        if @tty
          now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
          complete = event.total.to_i.positive? && event.done.to_i >= event.total.to_i
          return if now - @last_draw < REDRAW_INTERVAL && !complete

          @last_draw = now
          redraw
        elsif event.total.to_i.positive? && event.done.to_i >= event.total.to_i && !@completed[event.digest]
          @completed[event.digest] = true
          @io.puts "#{short(event.digest)}  #{bytes(event.total)}  done"
        end
      end

      # Draws the final state (every bar full) on a terminal.
      def finish
        redraw if @tty && !@layers.empty?
      end

      private

      def redraw
        @io.write("\e[#{@drawn}A") if @drawn.positive?
        @layers.each { |digest, (done, total)| @io.write("\e[2K#{line(digest, done, total)}\n") }
        @drawn = @layers.size
        @io.flush
      end

      def line(digest, done, total)
        fraction = total.positive? ? [done.to_f / total, 1.0].min : 0.0
        filled = (fraction * WIDTH).round
        format("%s  [%s%s] %5.1f%%  %s / %s", short(digest), "#" * filled, " " * (WIDTH - filled),
               fraction * 100, bytes(done), total.positive? ? bytes(total) : "?")
      end

      def short(digest)
        digest.to_s.sub(/\Asha256:/, "")[0, 12]
      end

      def bytes(count)
        format("%.1f MiB", count.to_f / (1024 * 1024))
      end
    end
  end
end
