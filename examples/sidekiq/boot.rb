# frozen_string_literal: true

# Loaded by each worker: `sidekiq -r ./examples/sidekiq/boot.rb`. REDIS_URL names the
# Redis server (default redis://127.0.0.1:6379/0), SANDBOX_IMAGE the image of the sandboxes.
require_relative "sandbox_job"

# Debian's sidekiq 6.4 calls redis-rb 4.8 APIs that warn on every poll; quiet them.
Redis.silence_deprecations = true if Redis.respond_to?(:silence_deprecations=)

Sidekiq.configure_server do |config|
  config.redis = { url: ENV.fetch("REDIS_URL", "redis://127.0.0.1:6379/0") }
  config.on(:startup) do
    swept = SandboxJob.sweep
    Sidekiq.logger.info("removed #{swept.size} sandbox(es) left by killed workers: #{swept.join(', ')}") unless swept.empty?
  end
end

Sidekiq.configure_client do |config|
  config.redis = { url: ENV.fetch("REDIS_URL", "redis://127.0.0.1:6379/0") }
end
