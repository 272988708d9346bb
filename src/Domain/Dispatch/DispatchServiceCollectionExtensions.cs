using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Quartz;

namespace FineTune.Domain.Dispatch;

public static class DispatchServiceCollectionExtensions
{
    /// <summary>Quartz table prefix: the tables live in schema "quartz" (created by our migrations).</summary>
    public const string TablePrefix = "quartz.qrtz_";

    /// <summary>
    /// Registers the clustered Quartz scheduler on our Postgres database and <see cref="IJobDispatcher"/>.
    /// With <paramref name="servedPools"/> null the process only schedules (the API): its scheduler is never started,
    /// so it never acquires jobs nor checks in as a node. A worker passes the pools it serves and its slot count,
    /// and adds the hosted service that starts the scheduler.
    /// </summary>
    public static IServiceCollection AddFineTuneDispatch(this IServiceCollection services, IConfiguration configuration,
        string connectionString, IReadOnlyList<string>? servedPools = null, int slots = 1)
    {
        var options = configuration.GetSection(DispatchOptions.Section).Get<DispatchOptions>() ?? new DispatchOptions();
        services.AddQuartz(q =>
        {
            q.UseDefaultThreadPool(Math.Max(1, slots));
            q.ConfigureScheduler(s =>
            {
                s.InstanceName = options.SchedulerName;
                s.GenerateInstanceId = true;
                s.IdleWaitTime = options.IdleWaitTime;
                // A rolling restart hands running jobs to another node instead of waiting for them to finish.
                s.ShutdownJobInterruption = ShutdownJobInterruption.Always;
            });
            q.UsePersistentStore(store =>
            {
                store.UsePostgres(connectionString);
                store.UseSystemTextJsonSerializer();
                store.ConfigureStore(s =>
                {
                    s.TablePrefix = TablePrefix;
                    s.RecoverFiringsCancelledByShutdown = true;
                    s.StoreJobDataAsStrings = true;
                });
                store.UseClustering(c =>
                {
                    c.CheckinInterval = options.CheckinInterval;
                    c.CheckinMisfireThreshold = options.CheckinMisfireThreshold;
                });
            });
            if (servedPools is { Count: > 0 }) q.ServeExecutionGroups([.. servedPools]);
        });
        services.AddSingleton<QuartzJobDispatcher>();
        services.AddSingleton<IJobDispatcher>(sp => sp.GetRequiredService<QuartzJobDispatcher>());
        if (servedPools is { Count: > 0 })
        {
            services.AddTransient<FineTuneQuartzJob>(); // needs the worker's IJobRunner
            services.AddQuartzHostedService(h => h.WaitForJobsToComplete = true);
        }
        return services;
    }
}
