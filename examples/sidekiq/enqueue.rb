# frozen_string_literal: true

# Enqueues a few jobs and prints their results as they arrive:
#   ruby -I lib examples/sidekiq/enqueue.rb
require "securerandom"
require_relative "boot"

requests = 5.times.map do |i|
  id = SecureRandom.hex(8)
  SandboxJob.perform_async(id, "echo job #{i} on $(hostname); exit #{i % 2}", 30)
  id
end
deadline = Time.now + 600
pending = requests.dup
until pending.empty? || Time.now > deadline
  pending.reject! do |id|
    raw = Sidekiq.redis { |r| r.get("sandbox-result:#{id}") }
    result = raw && JSON.parse(raw)
    next false unless result && result["state"] != "running"

    puts "#{id}: #{result.inspect}"
    true
  end
  sleep 0.5
end
abort "timed out waiting for #{pending.size} job(s)" unless pending.empty?
