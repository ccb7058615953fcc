# frozen_string_literal: true

require "securerandom"

module Microsandbox
  # A pool of ready sandboxes of one configuration: {#checkout} hands out one that is
  # already running (no boot, no restore on the caller's path), and a background thread
  # creates its replacement. With templates (see {Templates}) a refill is a restore, so a
  # pool of a few sandboxes keeps up with a steady stream of short jobs.
  #
  # Every sandbox is used once: after the block it is stopped and removed, never handed
  # out again (it may hold the previous job's files, processes and secrets).
  #
  #   pool = Microsandbox::Pool.new(image: "python:3.12-slim", size: 2, memory: 256)
  #   pool.checkout { |sb| sb.exec("python3", ["-c", "print(1)"]).stdout }
  #   pool.shutdown
  #
  # Bounds: at most `size` sandboxes exist at once besides those checked out (ready plus
  # being created). Threads: any number may call {#checkout}. Fork: a forked child never
  # touches its parent's sandboxes; its first {#checkout} starts a pool of its own. The
  # sandboxes die with the process that created them, also on `kill -9` (each is owned by
  # it, see "Lifecycle" in the README); their stopped directories are removed by
  # {#shutdown} or, after a crash, by `Sandbox.remove`.
  class Pool
    # How long a failing refill waits before the next attempt, in seconds.
    RETRY_DELAY = 1.0
    # Default {#checkout} wait, in seconds.
    DEFAULT_CHECKOUT_TIMEOUT = 120

    # @return [Integer] sandboxes kept ready
    attr_reader :size

    # A pool for the block's duration: shut down when it returns or raises.
    # @param (see #initialize)
    # @yieldparam pool [Pool]
    # @return [Object] the block's value
    def self.open(size:, **options)
      pool = new(size: size, **options)
      begin
        yield pool
      ensure
        pool.shutdown
      end
    end

    # @param size [Integer] sandboxes to keep ready (1-64)
    # @param name_prefix [String] sandbox names are `<prefix>-<random hex>`
    # @param options [Hash] options of {Sandbox.create} (`image:` required; not `detached:`,
    #   `replace:` or `labels:` — pool sandboxes are owned and labelled `pool`). `warm_up:`
    #   defaults to true here: a pooled sandbox has run `true` once before it is handed
    #   out, so the caller's first command is as fast as a later one. `ephemeral:` defaults
    #   to true too: a pooled sandbox leaves no record or disk once it has stopped, also
    #   when its owner dies with sandboxes ready or one half-created
    # @raise [ArgumentError] bad size or a forbidden option
    def initialize(size:, name_prefix: "pool", **options)
      raise ArgumentError, "missing keyword: :image" unless options.key?(:image)

      bad = options.keys & %i[detached replace replace_with_timeout labels]
      raise ArgumentError, "Pool does not take #{bad.join(', ')}" unless bad.empty?

      @size = Validate.integer!("size", size)
      raise ArgumentError, "size must be 1..64 (got #{@size})" unless (1..64).cover?(@size)

      @prefix = Validate.string!("name_prefix", name_prefix)
      @options = { warm_up: true, ephemeral: true }.merge(options, labels: { "pool" => @prefix })
      @lock = Mutex.new
      @changed = ConditionVariable.new
      @closed = false
      reset!
    end

    # Takes a ready sandbox (waiting up to `timeout` seconds for one), yields it, then
    # stops and removes it; a replacement is being created meanwhile.
    # @param timeout [Numeric] seconds to wait for a ready sandbox
    # @yieldparam sandbox [Sandbox]
    # @return [Object] the block's value
    # @raise [PoolTimeoutError] none ready in time (the message has the last create error)
    # @raise [PoolClosedError] after {#shutdown}
    def checkout(timeout: DEFAULT_CHECKOUT_TIMEOUT)
      raise ArgumentError, "checkout needs a block" unless block_given?

      sandbox = take(Validate.timeout!("timeout", timeout))
      begin
        yield sandbox
      ensure
        discard(sandbox)
      end
    end

    # @return [Integer] sandboxes ready now
    def ready_count
      ensure_process!
      @lock.synchronize { @ready.size }
    end

    # Stops the refill thread and stops and removes the ready sandboxes. Sandboxes checked
    # out at that moment finish their block normally. Idempotent.
    # @return [void]
    def shutdown
      return if @pid != Process.pid # a child owns nothing of its parent's pool

      ready = @lock.synchronize do
        @closed = true
        @changed.broadcast
        @ready.dup.tap { @ready.clear }
      end
      @filler&.join
      ready.each { |sb| discard(sb) }
      nil
    end

    def inspect
      "#<#{self.class} size=#{@size} ready=#{@ready.size} closed=#{@closed}>"
    end

    private

    # (Re)starts the pool's state for this process.
    def reset!
      @pid = Process.pid
      @ready = []
      @last_error = nil
      @filler = Thread.new { fill }
      @filler.name = "microsandbox-pool"
      @filler.report_on_exception = false
    end

    # In a forked child the inherited state (sandboxes, thread) is the parent's: start over.
    def ensure_process!
      @lock.synchronize { reset! if @pid != Process.pid }
    end

    # @param timeout [Float, nil] nil waits without limit
    def take(timeout)
      ensure_process!
      deadline = timeout && (Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout)
      @lock.synchronize do
        loop do
          raise PoolClosedError, "the pool was shut down" if @closed
          return @ready.shift.tap { @changed.broadcast } unless @ready.empty?

          left = deadline && (deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC))
          if left && left <= 0
            why = @last_error ? " (last create failed: #{@last_error.class}: #{@last_error.message})" : ""
            raise PoolTimeoutError, "no sandbox became ready within #{timeout}s#{why}; raise size: or timeout:"
          end
          @changed.wait(@lock, left)
        end
      end
    end

    # The refill loop: keeps `size` sandboxes ready.
    def fill
      loop do
        @lock.synchronize do
          @changed.wait(@lock) while !@closed && @ready.size >= @size
        end
        return if @closed

        begin
          sandbox = Sandbox.create("#{@prefix}-#{SecureRandom.hex(6)}", **@options)
        rescue StandardError => e
          @lock.synchronize { @last_error = e }
          sleep RETRY_DELAY
          next
        end
        keep = @lock.synchronize do
          @ready << sandbox unless @closed
          @changed.broadcast
          !@closed
        end
        discard(sandbox) unless keep
      end
    end

    def discard(sandbox)
      return unless sandbox.owns_lifecycle?

      sandbox.kill
      Sandbox.remove(sandbox.name)
    rescue Error
      nil # already gone; its directory is removed with Sandbox.remove later
    end
  end
end
