# frozen_string_literal: true

require "active_job"
require "microsandbox"

# An ActiveJob that runs untrusted shell code in a throwaway sandbox and hands the
# result to a callback (in a Rails app: save it on a record, broadcast it…). Works with
# any queue adapter (Sidekiq, GoodJob, Solid Queue, :async…): the adapter distributes
# jobs; each job's sandbox lives and dies on the machine that runs it.
#
#   SandboxRunJob.perform_later("echo hi", timeout: 10)
#
# Events: with ActiveSupport loaded, `create.microsandbox`, `exec.microsandbox`,
# `kill.microsandbox`, `remove.microsandbox` are published for each job (payloads never
# hold the code's arguments or environment values), next to ActiveJob's own events.
class SandboxRunJob < ActiveJob::Base
  queue_as :sandboxes

  # A VM that could not boot is worth another try; the code's own failures are results.
  retry_on Microsandbox::BootFailedError, wait: 5, attempts: 3

  IMAGE = ENV.fetch("SANDBOX_IMAGE", "alpine")

  class << self
    # Called with (job_id, result Hash); replace it in your app.
    attr_accessor :on_result
  end

  # @param script [String] shell code (untrusted)
  # @param timeout [Numeric] seconds
  def perform(script, timeout: 30)
    name = "aj-#{job_id}"
    sandbox = Microsandbox::Sandbox.create(name, image: IMAGE, replace: true, network: "none", memory: 256,
                                                 max_duration: timeout + 120, labels: { "app" => "active-job-example" })
    result = begin
      out = sandbox.shell(script, timeout: timeout)
      { status: :done, exit_code: out.exit_code, stdout: out.stdout, stderr: out.stderr }
    rescue Microsandbox::ExecTimeoutError
      { status: :timeout }
    end
    self.class.on_result&.call(job_id, result)
    result
  ensure
    sandbox&.kill # throwaway: no clean shutdown needed
    begin
      Microsandbox::Sandbox.remove(name) if name
    rescue Microsandbox::SandboxNotFoundError
      nil
    end
  end
end
