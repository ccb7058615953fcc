# frozen_string_literal: true

require "json"
require "sidekiq"
require "microsandbox"

# Runs one piece of untrusted shell code per job, each in its own throwaway microVM, and
# stores the result in Redis under "sandbox-result:<request_id>".
#
# What makes it safe to run many of these on many machines:
# - one sandbox per job, named after the job id, labelled so this app can find its own;
# - `network: "none"`, a memory cap, and an exec timeout (plus `max_duration:` as a
#   backstop should this process hang);
# - `ensure` kills and removes the VM on every way out of the job (return, exception,
#   Sidekiq::Shutdown when Sidekiq gives up waiting on TERM);
# - a worker killed with SIGKILL takes its VMs with it (they die with the process that
#   created them); the stopped records it leaves are swept when a worker starts
#   ({SandboxJob.sweep}) and replaced if the job runs again (`replace: true`).
class SandboxJob
  include Sidekiq::Worker
  sidekiq_options retry: 3

  LABELS = { "app" => "sidekiq-example" }.freeze
  IMAGE = ENV.fetch("SANDBOX_IMAGE", "alpine")

  # @param request_id [String] where the result goes
  # @param script [String] shell code to run (untrusted)
  # @param timeout [Numeric] seconds the code may run
  def perform(request_id, script, timeout = 30)
    name = "job-#{jid}"
    store(request_id, "state" => "running", "worker_pid" => Process.pid, "sandbox" => name)
    sandbox = Microsandbox::Sandbox.create(name, image: IMAGE, labels: LABELS, replace: true, network: "none",
                                                 memory: 256, max_duration: timeout + 120)
    result = begin
      out = sandbox.shell(script, timeout: timeout)
      { "state" => "done", "exit_code" => out.exit_code, "stdout" => out.stdout, "stderr" => out.stderr }
    rescue Microsandbox::ExecTimeoutError
      { "state" => "timeout", "timeout" => timeout }
    end
    store(request_id, result.merge("worker_pid" => Process.pid, "sandbox" => name))
  ensure
    # A throwaway VM needs no clean shutdown: kill it (instant), so this also completes
    # within the 3 s Sidekiq grants `ensure` blocks when it aborts jobs on shutdown.
    sandbox&.kill
    begin
      Microsandbox::Sandbox.remove(name) if name
    rescue Microsandbox::SandboxNotFoundError
      nil # never created (or already swept)
    end
  end

  # Removes the stopped sandboxes of this app that a killed worker left behind. Running
  # ones belong to live workers and are left alone.
  # @return [Array<String>] the names removed
  def self.sweep
    Microsandbox::Sandbox.list_with(labels: LABELS).select(&:stopped?).filter_map do |handle|
      handle.remove
      handle.name
    rescue Microsandbox::SandboxNotFoundError, Microsandbox::SandboxStillRunningError
      nil # another worker got there first, or it was just started again
    end
  end

  private

  def store(request_id, value)
    Sidekiq.redis { |redis| redis.set("sandbox-result:#{request_id}", JSON.generate(value), ex: 86_400) }
  end
end
