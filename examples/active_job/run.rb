# frozen_string_literal: true

# Runs SandboxRunJob in this process (ActiveJob's :inline adapter) and prints the
# microsandbox events as ActiveSupport::Notifications delivers them:
#   SANDBOX_IMAGE=/path/to/rootfs ruby -I lib examples/active_job/run.rb
require_relative "sandbox_run_job"

ActiveJob::Base.queue_adapter = :inline
ActiveJob::Base.logger = Logger.new(nil)
ActiveSupport::Notifications.subscribe(/\.microsandbox\z/) do |name, start, finish, _id, payload|
  shown = payload.except(:exception_object)
  puts format("%-22s %7.1f ms  %s", name, (finish - start) * 1000, shown)
end
SandboxRunJob.on_result = ->(id, result) { puts "job #{id}: #{result}" }
SandboxRunJob.perform_now("echo hello from $(uname -r); exit 2", timeout: 20)
