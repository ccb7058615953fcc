# frozen_string_literal: true

module Microsandbox
  class CLI
    # `doctor`: {Microsandbox.doctor} for a terminal or a script.
    module DoctorCommand
      private

      def cmd_doctor(argv)
        boot = false
        parser("doctor") do |p|
          p.separator "Checks this host: accelerator (KVM/HVF, or why not), QEMU, guest kernel, disk"
          p.separator "tools and space. Exits 1 only when no sandbox can boot; software emulation is"
          p.separator "a warning, not a failure."
          p.separator ""
          p.on("--boot", "also boot a throwaway sandbox and time it (installs the runtime if missing)") { boot = true }
        end.parse!(argv)
        expect_args!(argv, 0, 0, "doctor")
        report = Microsandbox.doctor(boot: boot)
        @json ? emit_json(report.to_h) : @out.write(report.to_s)
        report.ok? ? EXIT_CODES[:ok] : EXIT_CODES[:failure]
      end
    end
  end
end
